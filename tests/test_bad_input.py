"""Bad input to every `mtp` command is one `error: ...` line, exit status 2, and nothing on disk changes.

One table (`CASES`): each row builds its inputs in a fresh directory (the working directory of the run), runs
`mtp_cli.main.main(argv)` in-process, and checks the contract of the README: exit status 2, exactly one `error:` line on
stderr, carrying the expected fragment, no traceback (an exception escaping `main` fails the test), and a hash of the
case's directory and of every input directory taken before equals the one taken after (nothing written, nothing
deleted, no empty directory left behind). Inputs use the tiny random model of conftest.py.

Below the table: regression tests for the two data-loss bugs and the remote-code override of issue 13, and a test
that no secret reaches any file a training run writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mtp_cli.main import main as mtp_main

pytestmark = pytest.mark.usefixtures("restore_environment")  # recipes export their `env:` block
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja")


def tree_digest(*roots) -> str:
    """sha256 over every path (relative), its kind, permission bits and content, for each root in turn."""
    h = hashlib.sha256()
    for root in map(Path, roots):
        h.update(f"<root {root} exists={root.exists()}>".encode())
        if not root.exists():
            continue
        paths = [root] if root.is_file() else sorted(root.rglob("*"))
        for path in paths:
            rel = path.relative_to(root) if path != root else Path(".")
            mode = path.lstat().st_mode
            h.update(f"{rel}|{'d' if path.is_dir() else 'f'}|{oct(mode & 0o7777)}\0".encode())
            if path.is_file() and not path.is_symlink():
                h.update(path.read_bytes())
    return h.hexdigest()


@dataclass
class Ctx:
    """What a case may build on: its own directory (also the working directory), the tiny model, 24 GSM8K rows."""

    tmp: Path
    tiny: str
    rows: str

    def write(self, name: str, content: str | bytes) -> str:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(path)

    def model_copy(self, name: str = "model", weights: bool = True, **config_changes) -> Path:
        """A copy of the tiny model (config, tokenizer, weights); `config_changes` edit config.json (None deletes)."""
        out = self.tmp / name
        out.mkdir(parents=True)
        for f in Path(self.tiny).iterdir():
            if f.is_file() and (weights or f.name in MODEL_FILES):
                shutil.copy2(f, out / f.name)
        if config_changes:
            config = json.loads((out / "config.json").read_text())
            for key, value in config_changes.items():
                config.pop(key) if value is None else config.__setitem__(key, value)
            (out / "config.json").write_text(json.dumps(config))
        return out

    def recipe(self, name: str = "recipe.yaml", **overrides) -> str:
        """A one-step CPU recipe on the tiny model and the 24 rows; `overrides` replace keys (None drops one)."""
        recipe = {"model_name_or_path": self.tiny, "dataset_name": self.rows, "output_dir": str(self.tmp / "run"),
                  "max_steps": 1, "seq_len": 64, "num_regions": 2, "k_max": 8, "per_device_train_batch_size": 2,
                  "save_strategy": "no", "report_to": "none", "disable_tqdm": True, "eval_fraction": 0.0}
        for key, value in overrides.items():
            recipe.pop(key) if value is None else recipe.__setitem__(key, value)
        import yaml

        return self.write(name, yaml.safe_dump(recipe))

    def train(self, *flags: str, **recipe_overrides) -> list[str]:
        return ["train", "--config", self.recipe(**recipe_overrides), *flags]

    def old_run(self, name: str = "run") -> Path:
        """An output_dir holding an earlier run: a complete-looking checkpoint and a final model marker."""
        run = self.tmp / name
        (run / "checkpoint-5").mkdir(parents=True)
        (run / "checkpoint-5" / "trainer_state.json").write_text('{"global_step": 5}')
        (run / "checkpoint-5" / "model.safetensors").write_bytes(b"weights of the earlier run")
        (run / "config.json").write_text('{"model_type": "llama"}')
        return run

    def list_config_model(self) -> Path:
        """Tokenizer files and a config.json that is valid JSON but not a config (a list)."""
        model = self.model_copy("listconfig", weights=False)
        (model / "config.json").write_text("[1, 2]")
        return model

    def truncated_model(self) -> Path:
        model = self.model_copy("truncated")
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        return model

    def lora_bin_adapter(self) -> Path:
        adapter = self.tmp / "adapter"
        adapter.mkdir()
        for name in MODEL_FILES[2:]:
            if (Path(self.tiny) / name).is_file():
                shutil.copy2(Path(self.tiny) / name, adapter / name)
        (adapter / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "base_model_name_or_path": self.tiny, "r": 4, "lora_alpha": 8,
             "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}))
        (adapter / "adapter_model.bin").write_bytes(b"PK\x03\x04 a pickled state dict")
        return adapter


NOT_UTF8 = b"model_name_or_path: caf\xe9\n"
LONG_PROMPT = "the cat sat on the mat and " * 400  # about 2,800 tokens: the tiny model's context is 2,048
NO_GPU = not torch.cuda.is_available()

# (id, argv builder, fragment of the error line)
CASES = [
    # --- the dispatcher
    ("unknown-command", lambda c: ["frobnicate"], "unknown command"),
    # --- mtp train: data
    ("train-empty-dataset", lambda c: c.train(dataset_name=c.write("empty.jsonl", "")), "is empty"),
    ("train-blank-dataset", lambda c: c.train(dataset_name=c.write("blank.jsonl", "\n\n")), "is empty"),
    ("train-null-answer", lambda c: c.train(dataset_name=c.write(
        "null.jsonl", '{"question": "q1", "answer": "a1"}\n{"question": "q2", "answer": null}\n')), "null"),
    ("train-number-answer", lambda c: c.train(dataset_name=c.write(
        "num.jsonl", '{"question": "q1", "answer": 3}\n{"question": "q2", "answer": 4}\n')), "must hold text"),
    ("train-bad-jsonl-line", lambda c: c.train(dataset_name=c.write(
        "bad.jsonl", '{"question": "q", "answer": "a"}\n\n{"question": oops}\n')), "line 3"),
    ("train-non-utf8-dataset", lambda c: c.train(dataset_name=c.write("latin1.jsonl", b'{"question": "caf\xe9"}\n')),
     "not UTF-8"),
    ("train-missing-dataset", lambda c: c.train(dataset_name=str(c.tmp / "tyop.jsonl")), "not found"),
    ("train-wrong-columns", lambda c: c.train(dataset_name=c.write("cols.jsonl", '{"q": "x", "a": "y"}\n')),
     "columns"),
    # --- mtp train: model
    ("train-truncated-weights", lambda c: c.train(model_name_or_path=str(c.truncated_model())), "cannot load model"),
    ("train-config-is-a-list", lambda c: c.train(model_name_or_path=str(c.list_config_model())), "JSON object"),
    ("train-unknown-model-type", lambda c: c.train(
        model_name_or_path=str(c.model_copy(weights=False, model_type="banana"))), "unknown model_type"),
    ("train-missing-model", lambda c: c.train(model_name_or_path=str(c.tmp / "nomodel")), "does not exist"),
    # --- mtp train: recipe and flags
    ("train-non-utf8-recipe", lambda c: ["train", "--config", c.write("latin1.yaml", NOT_UTF8)], "not UTF-8"),
    ("train-unknown-recipe-key", lambda c: c.train(learning_rat=1e-4), "unknown key"),
    ("train-unknown-flag", lambda c: c.train("--learning_rat", "1e-4"), "unknown option"),
    ("train-learning-rate-nan", lambda c: c.train("--learning_rate", "nan"), "finite"),
    ("train-learning-rate-negative", lambda c: c.train("--learning_rate", "-1"), "learning_rate must be > 0"),
    ("train-k-min-above-k-max", lambda c: c.train("--k_min", "9"), "k_min"),
    ("train-bad-format", lambda c: c.train("--dataset_format", "xml"), "invalid choice"),
    ("train-prefix-cache-without-mask-only", lambda c: c.train("--prefix_cache", "true"),
     "prefix_cache needs lora_mask_only"),
    ("train-mask-only-without-lora", lambda c: c.train("--lora_mask_only", "true"), "needs a LoRA student"),
    ("train-config-without-path", lambda c: ["train", "--config"], "--config needs"),
    ("train-missing-recipe", lambda c: ["train", "--config", str(c.tmp / "nope.yaml")], "not found"),
    # --- mtp train: output_dir
    ("train-output-is-a-file", lambda c: c.train(output_dir=c.write("afile", "x")), "not a directory"),
    ("train-output-under-a-file", lambda c: c.train(output_dir=c.write("afile", "x") + "/run"), "not a directory"),
    ("train-output-unwritable", lambda c: c.train(output_dir="/sys/mtp-test-run"), "cannot write"),
    ("train-output-holds-a-run", lambda c: c.train(output_dir=str(c.old_run())), "already holds a run"),
    ("train-overwrite-bad-dataset", lambda c: c.train(
        "--overwrite_output_dir", "true", output_dir=str(c.old_run()), dataset_name=str(c.tmp / "tyop.jsonl")),
     "not found"),
    ("train-overwrite-empty-dataset", lambda c: c.train(
        "--overwrite_output_dir", "true", output_dir=str(c.old_run()), dataset_name=c.write("e.jsonl", "")),
     "is empty"),
    ("train-overwrite-broken-model", lambda c: c.train(
        "--overwrite_output_dir", "true", output_dir=str(c.old_run()),
        model_name_or_path=str(c.truncated_model())), "cannot load model"),
    ("train-resume-nothing", lambda c: c.train("--resume", "true"), "nothing to resume"),
    # --- mtp export
    ("export-output-is-parent-of-source", lambda c: [
        "export", "--model", str(c.model_copy("parent/src")), "--output", str(c.tmp / "parent"), "--overwrite"],
     "overlaps"),
    ("export-output-inside-source", lambda c: [
        "export", "--model", str(c.model_copy("src")), "--output", str(c.tmp / "src" / "out")], "overlaps"),
    ("export-output-is-source", lambda c: [
        "export", "--model", str(c.model_copy("src")), "--output", str(c.tmp / "src"), "--overwrite"], "overlaps"),
    ("export-output-not-created-by-export", lambda c: [
        "export", "--model", c.tiny, "--output", str(Path(c.write("mine/notes.txt", "mine")).parent), "--overwrite"],
     "not created by `mtp export`"),
    ("export-output-is-a-file", lambda c: ["export", "--model", c.tiny, "--output", c.write("afile", "x")],
     "not a directory"),
    ("export-k-max-too-large", lambda c: ["export", "--model", c.tiny, "--output", str(c.tmp / "o"),
                                          "--k-max", "10000"], "k_max must be an integer"),
    ("export-tau-out-of-range", lambda c: ["export", "--model", c.tiny, "--output", str(c.tmp / "o"),
                                           "--tau", "1.5"], "--tau"),
    ("export-bin-lora-adapter", lambda c: ["export", "--model", str(c.lora_bin_adapter()), "--output",
                                           str(c.tmp / "o")], "pickle"),
    ("export-truncated-weights", lambda c: ["export", "--model", str(c.truncated_model()), "--output",
                                            str(c.tmp / "o")], "cannot load model"),
    ("export-missing-model", lambda c: ["export", "--model", str(c.tmp / "nomodel"), "--output", str(c.tmp / "o")],
     "does not exist"),
    # --- mtp generate
    ("generate-truncated-weights", lambda c: ["generate", "--model", str(c.truncated_model()), "--prompt", "hi"],
     "cannot load model"),
    ("generate-config-is-a-list", lambda c: ["generate", "--model", str(c.list_config_model()), "--prompt", "hi"],
     "JSON object"),
    ("generate-unknown-model-type", lambda c: [
        "generate", "--model", str(c.model_copy(weights=False, model_type="banana")), "--prompt", "hi"],
     "unknown model_type"),
    ("generate-not-an-mtp-model", lambda c: [
        "generate", "--model", str(c.model_copy(weights=False, mtp_mask_token_id=None)), "--prompt", "hi"],
     "not an MTP model"),
    ("generate-non-utf8-batch-file", lambda c: [
        "generate", "--model", c.tiny, "--batch-file", c.write("p.jsonl", b'{"prompt": "caf\xe9"}\n')], "not UTF-8"),
    ("generate-non-utf8-prompt", lambda c: ["generate", "--model", c.tiny, "--prompt", "caf\udce9"], "UTF-8"),
    ("generate-bad-batch-line", lambda c: [
        "generate", "--model", c.tiny, "--batch-file", c.write("p.jsonl", '{"prompt": "a"}\n{"prompt": \n')], ":2:"),
    ("generate-html-under-a-file", lambda c: [
        "generate", "--model", c.tiny, "--prompt", "hi", "--html", c.write("afile", "x") + "/view.html"],
     "not a directory"),
    ("generate-html-is-a-directory", lambda c: [
        "generate", "--model", c.tiny, "--prompt", "hi", "--html", str(c.tmp)], "is a directory"),
    ("generate-prompt-longer-than-context", lambda c: [
        "generate", "--model", c.tiny, "--prompt", LONG_PROMPT, "--no-chat-template"], "context"),
    ("generate-max-new-tokens-overflow", lambda c: [
        "generate", "--model", c.tiny, "--prompt", "hi", "--max-new-tokens", "5000"], "context"),
    ("generate-k-max-too-large", lambda c: ["generate", "--model", c.tiny, "--prompt", "hi", "--k-max", "10000"],
     "k_max"),
    ("generate-missing-model", lambda c: ["generate", "--model", str(c.tmp / "nomodel"), "--prompt", "hi"],
     "does not exist"),
    # --- mtp regenerate
    ("regenerate-missing-model", lambda c: [
        "regenerate", "--model", str(c.tmp / "nomodel"), "--dataset", c.rows, "--output", str(c.tmp / "o.jsonl")],
     "does not exist"),
    ("regenerate-output-is-a-directory", lambda c: [
        "regenerate", "--model", c.tiny, "--dataset", c.rows, "--output", str(c.tmp)], "is a directory"),
    ("regenerate-output-not-its-own", lambda c: [
        "regenerate", "--model", c.tiny, "--dataset", c.rows, "--output", c.write("mine.jsonl", "{}\n")],
     "not written by `mtp regenerate`"),
    ("regenerate-bad-batch-size", lambda c: [
        "regenerate", "--model", c.tiny, "--dataset", c.rows, "--output", str(c.tmp / "o.jsonl"), "--batch-size", "0"],
     "--batch-size"),
    # --- mtp calibrate
    ("calibrate-output-under-a-file", lambda c: [
        "calibrate", "--model", c.tiny, "--dataset", c.rows, "--n", "4", "--output", c.write("afile", "x") + "/cal"],
     "not a directory"),
    ("calibrate-output-is-a-file", lambda c: [
        "calibrate", "--model", c.tiny, "--dataset", c.rows, "--n", "4", "--output", c.write("afile", "x")],
     "not a directory"),
    ("calibrate-config-is-a-list", lambda c: ["calibrate", "--model", str(c.list_config_model())], "JSON object"),
    ("calibrate-n-too-small", lambda c: ["calibrate", "--model", c.tiny, "--n", "1"], "--n"),
    # --- mtp tune
    ("tune-report-dir-under-a-file", lambda c: [
        "tune", "--model", str(c.model_copy()), "--target-drop", "0.1", "--dataset", c.rows, "--n", "4",
        "--report-dir", c.write("afile", "x") + "/tune"], "not a directory"),
    ("tune-target-drop-out-of-range", lambda c: ["tune", "--model", c.tiny, "--target-drop", "2"], "--target-drop"),
    ("tune-empty-dataset", lambda c: ["tune", "--model", str(c.model_copy()), "--target-drop", "0.1", "--no-write",
                                      "--dataset", c.write("e.jsonl", "")], "is empty"),
    # --- mtp evaluate
    ("evaluate-bad-strategy", lambda c: ["evaluate", "--model", c.tiny, "--strategies", "beam:3"], "beam"),
    ("evaluate-json-in-missing-dir", lambda c: ["evaluate", "--model", c.tiny, "--json",
                                                str(c.tmp / "no" / "such" / "r.json")], "--json"),
    ("evaluate-null-answer", lambda c: ["evaluate", "--model", c.tiny, "--dataset", c.write(
        "null.jsonl", '{"question": "q1", "answer": "#### 1"}\n{"question": "q2", "answer": null}\n')], "null"),
    # --- mtp bench-decode / bench-train
    ("bench-decode-device-banana", lambda c: ["bench-decode", "--model", c.tiny, "--device", "banana"],
     "not a device"),
    ("bench-decode-device-without-gpu", lambda c: [
        "bench-decode", "--model", c.tiny, "--device", "cuda" if NO_GPU else "cuda:63"], "--device cuda"),
    ("bench-decode-bad-batch-sizes", lambda c: ["bench-decode", "--model", c.tiny, "--batch-sizes", "x"],
     "--batch-sizes"),
    ("bench-decode-bad-concurrency", lambda c: ["bench-decode", "--model", c.tiny, "--concurrency", "1,0"],
     "--concurrency"),
    ("bench-decode-prompts-below-concurrency", lambda c: [
        "bench-decode", "--model", c.tiny, "--dataset", c.rows, "--concurrency", "1,16", "--prompts", "4",
        "--plot", c.write("sweep.png", b"an earlier figure")], "--prompts 4 is below the largest --concurrency 16"),
    ("bench-decode-plot-in-missing-dir", lambda c: ["bench-decode", "--model", c.tiny, "--plot",
                                                    str(c.tmp / "no" / "sweep.png")], "not an existing directory"),
    ("bench-decode-plot-not-png", lambda c: ["bench-decode", "--model", c.tiny, "--plot", str(c.tmp / "sweep.svg")],
     ".png"),
    ("bench-decode-plot-is-a-directory", lambda c: [
        "bench-decode", "--model", c.tiny, "--plot", str(Path(c.write("sweep.png/keep", "x")).parent)],
     "is a directory"),
    ("bench-decode-bad-k-max-keeps-the-old-plot", lambda c: [
        "bench-decode", "--model", c.tiny, "--dataset", c.rows, "--k-max", "banana",
        "--plot", c.write("sweep.png", b"an earlier figure")], "k_max"),
    ("bench-train-zero-steps", lambda c: ["bench-train", "--steps", "0"], "--steps"),
    # --- mtp demo
    ("demo-output-not-created-by-demo", lambda c: [
        "demo", "--minutes", "3", "--output-dir", str(Path(c.write("mine/notes.txt", "mine")).parent)],
     "not created by `mtp demo`"),
    ("demo-output-is-a-file", lambda c: ["demo", "--output-dir", c.write("afile", "x")], "not a directory"),
    ("demo-minutes-zero", lambda c: ["demo", "--minutes", "0"], "--minutes"),
]


@pytest.fixture
def ctx(tmp_path, tiny_model_dir, gsm8k_rows, monkeypatch) -> Ctx:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # anything a command writes into the working directory is seen by the hash
    return Ctx(work, tiny_model_dir, gsm8k_rows)


def test_every_command_has_rows():
    from mtp_cli.main import COMMANDS

    missing = [name for name in COMMANDS if not any(case[0].startswith(f"{name}-") for case in CASES)]
    assert not missing


@pytest.mark.parametrize("build, fragment", [pytest.param(b, f, id=i) for i, b, f in CASES])
def test_bad_input_is_one_error_line_and_changes_nothing(ctx, capsys, build, fragment):
    argv = build(ctx)
    roots = (ctx.tmp, ctx.tiny, ctx.rows)
    before = tree_digest(*roots)
    capsys.readouterr()
    rc = mtp_main(argv)  # an exception escaping here (a traceback) fails the test
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2, (rc, out[-2000:], err[-2000:])
    assert len(errors) == 1, err
    assert fragment in errors[0], errors[0]
    assert "Traceback" not in err + out
    assert tree_digest(*roots) == before, "the failed command changed files on disk"


# ---------------------------------------------------------------------------------------------------------------------
# Issue 13's two data-loss bugs and the remote-code override (each failed before the fix)


def test_export_overwrite_never_deletes_the_source_or_its_neighbours(ctx, capsys):
    src = ctx.model_copy("parent/src")
    neighbour = Path(ctx.write("parent/notes.txt", "unrelated"))
    before = tree_digest(ctx.tmp)
    rc = mtp_main(["export", "--model", str(src), "--output", str(src.parent), "--overwrite"])
    assert rc == 2 and "overlaps" in capsys.readouterr().err
    assert (src / "model.safetensors").is_file() and neighbour.read_text() == "unrelated"
    assert tree_digest(ctx.tmp) == before


def test_export_marks_and_replaces_only_its_own_directory(ctx, capsys):
    from distill.files import CREATED_MARKER

    out = ctx.tmp / "exported"
    assert mtp_main(["export", "--model", ctx.tiny, "--output", str(out)]) == 0
    assert (out / CREATED_MARKER).read_text().startswith("created by `mtp export`")
    mask = os.umask(0)
    os.umask(mask)
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask  # shared, not 0600
    assert mtp_main(["export", "--model", ctx.tiny, "--output", str(out), "--overwrite", "--strategy", "selfspec"]) == 0
    assert json.loads((out / "generation_config.json").read_text())["mtp_strategy"] == "selfspec"
    # the demo's marker says `mtp demo`: export does not take it over
    demo_dir = ctx.tmp / "demo"
    demo_dir.mkdir()
    from distill.files import mark_created

    mark_created(demo_dir, "mtp demo")
    assert mtp_main(["export", "--model", ctx.tiny, "--output", str(demo_dir), "--overwrite"]) == 2
    assert "not created by `mtp export`" in capsys.readouterr().err


def test_overwrite_output_dir_keeps_the_old_run_until_the_new_data_is_valid(ctx, capsys):
    run = ctx.old_run()
    before = tree_digest(run)
    rc = mtp_main(ctx.train("--overwrite_output_dir", "true", output_dir=str(run),
                            dataset_name=str(ctx.tmp / "mistyped.jsonl")))
    assert rc == 2 and "not found" in capsys.readouterr().err
    assert (run / "checkpoint-5" / "trainer_state.json").is_file() and tree_digest(run) == before


def test_overwrite_output_dir_starts_over_once_everything_is_valid(ctx, capsys):
    run = ctx.old_run()
    assert mtp_main(ctx.train("--overwrite_output_dir", "true", output_dir=str(run))) == 0
    assert not (run / "checkpoint-5").exists()  # the old run is gone only now
    assert json.loads((run / "config.json").read_text())["mtp_mask_token_id"] is not None
    mask = os.umask(0)
    os.umask(mask)
    assert (run / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask


REMOTE_CODE = '''
from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM

Path(SENTINEL).write_text("yes")


class SentinelConfig(LlamaConfig):
    model_type = "llama"


class SentinelForCausalLM(LlamaForCausalLM):
    config_class = SentinelConfig
'''


def _remote_code_model(ctx) -> Path:
    model = ctx.model_copy("remote", auto_map={"AutoConfig": "sentinel.SentinelConfig",
                                               "AutoModelForCausalLM": "sentinel.SentinelForCausalLM"})
    # transformers copies the module into its own cache before importing it: the sentinel path is absolute
    (model / "sentinel.py").write_text(REMOTE_CODE.replace("SENTINEL", repr(str(ctx.tmp / "REMOTE_CODE_RAN"))))
    return model


def test_command_line_false_beats_a_recipes_trust_remote_code(ctx, capsys):
    model = _remote_code_model(ctx)
    argv = ctx.train("--trust_remote_code", "false", model_name_or_path=str(model),
                     model_init_kwargs={"trust_remote_code": True}, output_dir=str(ctx.tmp / "run"))
    assert mtp_main(argv) == 0
    assert not (ctx.tmp / "REMOTE_CODE_RAN").exists(), "the model's own code ran against --trust_remote_code false"
    assert not (ctx.tmp / "run" / "sentinel.py").exists()
    assert "remote code is enabled" not in capsys.readouterr().err


@pytest.mark.parametrize("recipe, flags, expected", [
    ({}, [], False),
    ({"model_init_kwargs": {"trust_remote_code": True}}, ["--trust_remote_code", "false"], False),
    ({"model_init_kwargs": {"trust_remote_code": True}}, [], True),
    ({"trust_remote_code": True, "model_init_kwargs": {"trust_remote_code": False}}, [], False),
    ({"trust_remote_code": False}, ["--trust_remote_code", "true"], True),
    ({"model_init_kwargs": {"trust_remote_code": False}}, ["--trust_remote_code=true"], True),
])
def test_effective_trust_remote_code(ctx, recipe, flags, expected):
    from distill.recipe import parse_args

    script_args, config, _ = parse_args(ctx.train(*flags, **recipe)[1:])
    assert script_args.trust_remote_code is expected
    assert config.model_init_kwargs["trust_remote_code"] is expected


def test_trust_remote_code_is_announced(ctx, capsys):
    model = _remote_code_model(ctx)
    assert mtp_main(ctx.train("--trust_remote_code", "true", model_name_or_path=str(model),
                              output_dir=str(ctx.tmp / "run"))) == 0
    err = capsys.readouterr().err
    assert err.count("remote code is enabled") == 1
    assert (ctx.tmp / "REMOTE_CODE_RAN").exists()  # asked for explicitly: it runs


# ---------------------------------------------------------------------------------------------------------------------
# Secrets


def test_secrets_never_reach_a_file_the_run_writes(ctx, capsys, monkeypatch):
    pytest.importorskip("wandb")
    secrets = {"HF_TOKEN": "hf_DUMMYenvTOKEN0123456789", "WANDB_API_KEY": "0123456789abcdefDUMMYwandbKEY0123456789ab",
               "--hub_token": "hf_DUMMYflagTOKEN9876543210"}
    monkeypatch.setenv("HF_TOKEN", secrets["HF_TOKEN"])
    monkeypatch.setenv("WANDB_API_KEY", secrets["WANDB_API_KEY"])
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(ctx.tmp))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = ctx.tmp / "run"
    argv = ctx.train("--hub_token", secrets["--hub_token"], "--max_steps", "2", "--save_strategy", "steps",
                     "--save_steps", "1", "--logging_steps", "1", "--report_to", "wandb", output_dir=str(run))
    # A process of its own: wandb keeps one process-wide setup (its directory included) from its first run on, and it
    # records the process's real command line, which holds the token.
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "mtp_cli", *argv], capture_output=True, text=True, timeout=600)
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 0, err[-2000:]
    assert (run / "checkpoint-1" / "training_args.bin").is_file() and (run / "training_args.bin").is_file()
    wandb_files = [p for p in ctx.tmp.rglob("*") if p.is_file() and "wandb" in p.parts]
    assert any(p.suffix == ".wandb" for p in wandb_files), "the offline wandb run was not written"
    written = [p for p in ctx.tmp.rglob("*") if p.is_file()]
    for name, value in secrets.items():
        assert value not in out + err, f"{name} printed"
        for path in written:
            assert value.encode() not in path.read_bytes(), f"{name} found in {path.relative_to(ctx.tmp)}"
    assert "HF_TOKEN" in err  # the user is told where the token went


# ---------------------------------------------------------------------------------------------------------------------
# The smaller points of issue 13


def test_console_script_prints_one_line_and_no_wandb_banner(tmp_path):
    """The real process (interpreter, imports, environment): only the error line, no `[INFO] Running in WANDB offline
    mode` from a command that never uses wandb."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    proc = subprocess.run([sys.executable, "-m", "mtp_cli", "train", "--config", str(tmp_path / "nope.yaml")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout
    assert proc.stderr.strip().splitlines() == [f"error: config file {tmp_path / 'nope.yaml'} not found"]
    assert sorted(tmp_path.iterdir()) == []


def test_terminal_view_escapes_control_characters(tiny_model_dir):
    from types import SimpleNamespace

    from adaptive.chunkview import ANSI_RESET, render_terminal
    from distill.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    ids = tok("safe\x1b]0;pwned\x07\x1b[2Jtext\r", add_special_tokens=False)["input_ids"]
    result = SimpleNamespace(token_ids=ids, accepted_per_step=[1] * len(ids))
    shown = render_terminal(result, tok, color=True)
    assert "\x07" not in shown and "\r" not in shown and "\x1b]" not in shown and "\x1b[2J" not in shown
    assert "\\x1b]0;pwned\\x07\\x1b[2Jtext\\x0d" in shown.replace(ANSI_RESET, "").replace("\x1b[30;48;5;153m", "")\
        .replace("\x1b[30;48;5;223m", "")
    assert "\x1b" in render_terminal(result, tok, color=False)  # not a TTY: the text is passed through unchanged


def test_demo_ends_with_one_line_when_training_is_stopped(tmp_path, monkeypatch):
    from adaptive import demo
    from distill import run
    from distill.errors import UserError

    def stopped_by_sigterm(config, model_args, prepared, **kwargs):  # what run.train does on SIGTERM: a checkpoint
        (Path(config.output_dir) / "checkpoint-3").mkdir(parents=True)  # and no model

    monkeypatch.setattr(run, "prepare", lambda config: None)  # the test's train.jsonl does not exist
    monkeypatch.setattr(run, "train", stopped_by_sigterm)
    with pytest.raises(UserError, match="training stopped before the model was saved"):
        demo.distil(demo.Plan.for_minutes(3), tmp_path / "train.jsonl", tmp_path / "model")


def test_tool_markers_name_their_command(tmp_path):
    from distill.files import CREATED_MARKER, check_replaceable_dir, created_by, mark_created

    assert created_by(tmp_path) is None
    mark_created(tmp_path, "mtp demo")
    assert created_by(tmp_path) == "mtp demo" and (tmp_path / CREATED_MARKER).is_file()
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / ".mtp-demo").write_text("created by `mtp demo`\n")  # what the demo wrote before the marker was shared
    assert created_by(legacy) == "mtp demo"
    (tmp_path / "x").write_text("x")
    assert check_replaceable_dir(tmp_path, command="mtp demo", flag="--o", overwrite=True) == tmp_path.resolve()


def test_line_separators_inside_json_strings_are_not_line_breaks(tmp_path):
    """The checks that name a bad line split on "\\n" only: U+2028 / U+0085 inside a string are valid JSON lines."""
    from adaptive.prompts import read_prompts
    from distill.data import load_examples

    rows = [{"question": "a\u2028b", "answer": "c\x85d"}, {"question": "e", "answer": "f\u2029g"}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    ds = load_examples(str(path))
    assert ds["query"] == ["a\u2028b", "e"] and ds["response"] == ["c\x85d", "f\u2029g"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "x\u2028y"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_prompts(None, str(prompts)) == ["x\u2028y"]
