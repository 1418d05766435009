"""Hypothesis strategies for valid specs, shared by the spec and (later) the supernet tests."""

from hypothesis import strategies as st

from nas.registry import ACTIVATIONS, BLOCK_KERNELS, STEM_KERNELS
from nas.spec import BatchNormSpec, BlockSpec, ClassifierSpec, InputSpec, LastConvSpec, NetworkSpec, StemSpec

activations = st.sampled_from(list(ACTIVATIONS))
channels = st.integers(1, 24)


@st.composite
def network_specs(draw: st.DrawFn, max_blocks: int = 4) -> NetworkSpec:
    stem = StemSpec(draw(channels), draw(st.sampled_from(STEM_KERNELS)), draw(st.sampled_from([1, 2])),
                    draw(activations))
    blocks = []
    cin = stem.out_channels
    for _ in range(draw(st.integers(1, max_blocks))):
        b = BlockSpec(cin, draw(st.sampled_from(BLOCK_KERNELS)), draw(channels), draw(channels), draw(st.booleans()),
                      draw(activations), draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 1, 2])))
        blocks.append(b)
        cin = b.out_channels
    metadata = draw(st.dictionaries(st.text(max_size=8), st.one_of(st.integers(), st.text(max_size=12),
                                                                  st.floats(allow_nan=False), st.booleans()),
                                    max_size=3))
    return NetworkSpec(
        format_version=1,
        input=InputSpec(draw(st.integers(8, 24)), draw(st.integers(1, 4))),
        num_classes=draw(st.integers(1, 12)),
        stem=stem,
        blocks=tuple(blocks),
        last_conv=LastConvSpec(draw(channels), draw(activations)),
        classifier=draw(st.one_of(  # MobileNetV3's two-layer head or MobileNetV2's single linear
            st.builds(ClassifierSpec, channels, activations, st.floats(0.0, 0.9)),
            st.builds(ClassifierSpec, st.none(), st.none(), st.floats(0.0, 0.9)))),
        batch_norm=BatchNormSpec(draw(st.floats(1e-6, 0.1)), draw(st.floats(0.001, 1.0))),
        metadata=metadata,
    )
