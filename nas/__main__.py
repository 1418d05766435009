from nas.cli import main

if __name__ == "__main__":  # not when a worker of nas.runtime.prepare_all imports it (where workers spawn)
    raise SystemExit(main())
