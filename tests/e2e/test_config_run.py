"""config.yaml holds the config a run used (switches it could not use resolved to false, with
a console line), nothing changes it afterwards, and a removed key stops the command in one line."""
import pytest
import yaml

from tasks import classify
from tasks.engine.checkpoint import atomic_save, load_checkpoint
from tasks.engine.runner import run_cli
from tests.fakes import write_fake_fashion_mnist


def test_config_yaml_is_what_ran_and_is_never_changed_after(tmp_path, capsys):
    fm = write_fake_fashion_mnist(tmp_path / "fm", n_train=64, n_test=32)
    out = tmp_path / "run"
    # a recipe's GPU switches, asked for on the CPU
    classify.main(["--device", "cpu", "--data-dir", str(fm), "--epochs", "2", "--batch-size", "32", "--output",
                   str(out), "--set", "model.width=8", "--set", "train.cuda_graph=true", "--set",
                   "train.graph_eval=true", "--set", "train.compile_inference=true", "--set", "train.log_every=1"])
    said = capsys.readouterr().out
    assert "train.cuda_graph, train.graph_eval: false (CUDA only; the device is cpu)" in said
    assert "train.compile_inference: false (it compiles what train.graph_eval replays" in said
    written = yaml.safe_load((out / "config.yaml").read_text())
    t = written["train"]
    assert (t["cuda_graph"], t["graph_eval"], t["compile_inference"], t["amp"], t["cudnn_benchmark"]) == (False,) * 5
    assert t["device"] == "cpu" and written["model"]["width"] == 8
    # the checkpoints store that same config: the last one, written after both epochs, equals it
    assert load_checkpoint(out / "last.pt")["config"] == written
    assert load_checkpoint(out / "best.pt")["config"] == written
    # a checkpoint of a version that still had removed keys, and no train.graph_eval, resumes:
    # they are dropped as it is read, and the run keeps its resolved config and writes it again
    ckpt = load_checkpoint(out / "last.pt")
    ckpt["config"]["data"].update(mixup_alpha=0.0, mix_off_epochs=0)
    ckpt["config"]["train"]["cudnn_benchmark_limit"] = 10
    del ckpt["config"]["train"]["graph_eval"]
    atomic_save(ckpt, out / "last.pt")
    classify.main(["--resume", str(out), "--epochs", "3", "--data-dir", str(fm), "--quiet"])
    again = yaml.safe_load((out / "config.yaml").read_text())
    assert {**again, "train": {**again["train"], "epochs": 2}} == written and again["train"]["epochs"] == 3
    assert load_checkpoint(out / "last.pt")["config"] == again


@pytest.mark.parametrize("argv", [["--set", "model.dice_weight=1"], ["--set", "data.mixup_alpha=0.2"]])
def test_a_removed_key_exits_2_with_one_line(tmp_path, argv, capsys):
    # in this process, as the command line runs main (test_config_cli runs one real process)
    from tasks import segment
    main = segment.main if "dice" in argv[1] else classify.main
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(["--device", "cpu", "--output", str(tmp_path / "r"), *argv]))
    key = argv[1].split("=")[0]
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"{key} was removed (" in lines[0]
    assert "docs/CONFIG.md" in lines[0] and not (tmp_path / "r").exists()
