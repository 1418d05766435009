from nas.cli import main

if __name__ == "__main__":  # not when a spawned worker imports it (nas.runtime.prepare_all)
    raise SystemExit(main())
