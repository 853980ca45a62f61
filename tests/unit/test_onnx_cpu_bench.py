"""benchmarks.onnx_cpu's untrained checkpoints load as the models they stand for (the benchmark
itself exports three models: tens of seconds, run by hand)."""
from benchmarks.onnx_cpu import untrained_checkpoints
from tasks import export
from tasks.data.preprocess import Preprocess


def test_untrained_checkpoints_load_with_their_sizes(tmp_path):
    loaded = [export.load_model(path) for path in untrained_checkpoints(tmp_path)]
    assert [task for task, _, _ in loaded] == ["classify", "detect", "segment"]
    assert [export.in_channels(model) for _, model, _ in loaded] == [3, 3, 3]
    assert [Preprocess.from_meta(meta).size for _, _, meta in loaded] == [224, 256, 256]
