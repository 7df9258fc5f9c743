"""`python -m dreambooth.evaluate` (and its `benchmark`) against DreamBooth's numbers computed with transformers
and timm on held-out folders (tests/fixtures/evaluate/reference.json, made by tools/make_reference_eval.py)."""
import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

import sample
from dreambooth import benchmark, evaluate
from dreambooth.data import image_files
from dreambooth.prompts import (PROMPTS_FILE, benchmark_prompts, dataset_subject, drop_token, read_prompts,
                                record_prompt)

FIX = Path(__file__).parent / "fixtures"
EVAL = FIX / "evaluate"
REFERENCE = json.loads((EVAL / "reference.json").read_text())
DINO = {"hf": FIX / "dino" / "hf_vitmodel", "timm": FIX / "dino" / "timm"}
CLIP = FIX / "clip_model" / "l14"
WORLD_SD = Path(__file__).parents[1] / "embedded" / "world_sd"
METRICS = ("dino", "clip_i", "clip_t", "pres", "real_dino", "real_clip_i")


def score_argv(out=None, *, real=EVAL / "real", generated=EVAL / "generated", prompts=None, dino=DINO["hf"], clip=CLIP,
               class_generated=EVAL / "class_generated", extra=()):
    argv = ["--real", str(real), "--generated", str(generated),
            "--prompts", str(prompts or Path(generated) / PROMPTS_FILE), "--dino", str(dino), "--clip", str(clip)]
    argv += ["--class_generated", str(class_generated)] if class_generated else []
    return argv + (["--out", str(out)] if out else []) + list(extra)


# ---- the numbers --------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout,drop", [("hf", None), ("timm", "sks")])
def test_numbers_equal_transformers_and_timm(tmp_path, capsys, layout, drop):
    out = tmp_path / "scores.json"
    extra = ["--precision", "fp32", "--batch_size", "4"] + (["--drop_token", drop] if drop else [])
    assert evaluate.main(score_argv(out, dino=DINO[layout], extra=extra)) == 0
    result, ref = json.loads(out.read_text()), REFERENCE[layout]
    for key in METRICS:
        expected = ref["clip_t_drop_token" if key == "clip_t" and drop else key]
        assert abs(result[key] - expected) <= 1e-5 * abs(expected), key
    assert result["counts"] == {**REFERENCE["counts"], "prompts": 2}
    assert [(p["prompt"], p["images"]) for p in result["per_prompt"]] == (
        [(drop_token(p, drop) if drop else p, 3) for p in ("a sks dog in the jungle", "a red sks dog")])
    assert result["settings"]["precision"] == "fp32" and result["settings"]["drop_token"] == drop
    table = capsys.readouterr().out
    assert "DINO" in table and "CLIP-T" in table and "PRES" in table and f"{result['dino']:.3f}" in table


def test_bf16_close_to_the_reference(tmp_path):
    """Autocast bf16 (the default where the CPU has it): within 5e-3 of the fp32 reference (1.6e-3 measured here)."""
    out = tmp_path / "scores.json"
    assert evaluate.main(score_argv(out, extra=["--precision", "bf16"])) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["precision"] == "bf16"
    for key in METRICS:
        assert abs(result[key] - REFERENCE["hf"][key]) <= 5e-3, key


def test_without_class_images_no_pres(tmp_path):
    out = tmp_path / "scores.json"
    assert evaluate.main(score_argv(out, class_generated=None, extra=["--precision", "fp32"])) == 0
    result = json.loads(out.read_text())
    assert "pres" not in result and result["counts"]["class_generated"] == 0
    assert abs(result["dino"] - REFERENCE["hf"]["dino"]) <= 1e-5


# ---- bad input: one line naming the flag and the file, before any model is loaded ---------------------------
def bad_input_cases(tmp: Path) -> dict:
    def folder(name, files=()):
        path = tmp / name
        path.mkdir()
        for f in files:
            shutil.copy(f, path)
        return path
    gen = lambda: sorted((EVAL / "generated").iterdir())
    only_prompts = folder("only_prompts", [EVAL / "generated" / PROMPTS_FILE])
    extra = folder("extra", gen())
    Image.new("RGB", (8, 8)).save(extra / "99999.png")
    broken = folder("broken", gen())
    (broken / "00001.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    bad_json = tmp / "bad.jsonl"
    bad_json.write_text('{"image": "00000.png", "prompt": "a"}\nnot json\n')
    ghost = tmp / "ghost.jsonl"
    ghost.write_text((EVAL / "generated" / PROMPTS_FILE).read_text() + '{"image": "nope.png", "prompt": "a"}\n')
    return {
        "empty real": (dict(real=folder("empty")), "--real", "no images in it"),
        "no generated images": (dict(generated=only_prompts), "--generated", "no images in it"),
        "prompts name a missing image": (dict(prompts=ghost), "--prompts", "names 1 images that are not in --generated"),
        "an image without a prompt": (dict(generated=extra, prompts=EVAL / "generated" / PROMPTS_FILE), "--prompts",
                                      "has no prompt for 1 images of --generated .*: 99999.png"),
        "prompts not JSON": (dict(prompts=bad_json), "--prompts", "line 2 is not JSON"),
        "an image that does not decode": (dict(generated=broken), "--generated", "00001.png is not a readable image"),
        "empty class folder": (dict(class_generated=folder("empty_class")), "--class_generated", "no images in it"),
        "transformers classifier as --dino": (dict(dino=FIX / "vit" / "hf_classifier"), "--dino",
                                              "a ViT classifier .*not a DINO backbone"),
        "timm classifier as --dino": (dict(dino=FIX / "vit" / "timm"), "--dino", "a ViT classifier"),
        "CLIP as --dino": (dict(dino=CLIP), "--dino", "not a ViT checkpoint"),
        "missing --dino": (dict(dino=tmp / "nowhere"), "--dino", "no such file or folder"),
        "text-only CLIP": (dict(clip=FIX / "clip_model" / "b32_text"), "--clip", "text tower only"),
        "image-only CLIP": (dict(clip=FIX / "clip_model" / "b32_vision"), "--clip", "image tower only"),
        "SD's text encoder as --clip": (dict(clip=FIX / "clip" / "text_encoder"), "--clip", "without text_projection"),
        "DINO as --clip": (dict(clip=DINO["timm"]), "--clip", "not a CLIP model"),
        "--out not JSON": (dict(out=tmp / "scores.txt"), "--out", "must end in .json"),
        "--drop_token of two words": (dict(extra=["--drop_token", "sks dog"]), "--drop_token", "must be one word"),
    }


def test_bad_input_one_line_before_any_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(evaluate, "score", lambda *a, **k: pytest.fail("a model was loaded"))
    for name, (kwargs, flag, words) in bad_input_cases(tmp_path).items():
        assert evaluate.main(score_argv(**kwargs)) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, (name, err)
        assert err.startswith(f"python -m dreambooth.evaluate: error: {flag} "), (name, err)
        assert re.search(words, err), (name, err)


def test_prompts_file_reading(tmp_path):
    path = tmp_path / PROMPTS_FILE
    record_prompt(tmp_path, "00000.png", "a sks dog")
    record_prompt(tmp_path, "00001.png", 'a "quoted" dog, ünïcode')
    assert read_prompts(path) == {"00000.png": "a sks dog", "00001.png": 'a "quoted" dog, ünïcode'}
    path.write_text(path.read_text() + '{"image": "00000.png", "prompt": "again"}\n')
    with pytest.raises(ValueError, match="line 3 names 00000.png a second time"):
        read_prompts(path)
    path.write_text('{"image": 3, "prompt": "a"}\n')
    with pytest.raises(ValueError, match="line 1 is not an object"):
        read_prompts(path)
    assert drop_token("a sks dog on sksy sand", "sks") == "a dog on sksy sand"


# ---- sample.py's prompts.jsonl, read by the evaluation and skipped by the trainer --------------------------
def test_sample_py_writes_the_prompts_file(tmp_path):
    common = ["--ddim_steps", "1", "--n_samples", "2", "--H", "32", "--W", "32", "--outdir", str(tmp_path)]
    sample.main(["--prompt", "a sks dog in the snow"] + common)
    sample.main(["--prompt", "a red sks dog"] + common)          # numbering continues; so does the file
    samples = tmp_path / "samples"
    assert read_prompts(samples / PROMPTS_FILE) == {"00000.png": "a sks dog in the snow", "00001.png": "a sks dog in the snow",
                                                    "00002.png": "a red sks dog", "00003.png": "a red sks dog"}
    assert [p.name for p in image_files(samples, flag="--class_data_dir")] == [f"0000{i}.png" for i in range(4)]
    out = tmp_path / "scores.json"
    assert evaluate.main(score_argv(out, generated=samples, class_generated=None)) == 0
    assert json.loads(out.read_text())["counts"]["generated"] == 4


# ---- the benchmark protocol ---------------------------------------------------------------------------
def test_benchmark_prompts_are_the_papers():
    objects, live = benchmark_prompts("sks", "dog", live=False), benchmark_prompts("sks", "dog", live=True)
    assert len(objects) == len(live) == 25
    assert objects[0] == live[0] == "a sks dog in the jungle" and objects[-1] == live[-1] == "a cube shaped sks dog"
    assert "a sks dog wearing a santa hat" in live and "a sks dog wearing a santa hat" not in objects
    assert "a sks dog floating in an ocean of milk" in objects
    assert dataset_subject("dog6") == ("dog", True) and dataset_subject("bear_plushie") == ("stuffed animal", False)
    assert dataset_subject("my_dog") is None


def test_benchmark_end_to_end(tmp_path, capsys):
    """On the embedded world model with the tiny DINO and CLIP: the first 3 live-subject prompts, 2 images each
    (the paper: 25 and 4), 2 class images; sample.py gives the same images for a prompt; rescoring agrees."""
    subject = tmp_path / "dog6"                                   # a dataset subject: its class noun is known
    shutil.copytree(EVAL / "real", subject)
    outdir = tmp_path / "bench"
    argv = ["benchmark", "--model", str(WORLD_SD), "--subject", str(subject), "--dino", str(DINO["hf"]), "--clip", str(CLIP),
            "--num_prompts", "3", "--images_per_prompt", "2", "--ddim_steps", "1", "--H", "32", "--class_images", "2",
            "--outdir", str(outdir), "--precision", "fp32"]
    assert evaluate.main(argv) == 0
    result = json.loads((outdir / "scores.json").read_text())
    prompts = read_prompts(outdir / "samples" / PROMPTS_FILE)
    assert list(prompts.values()) == [p for p in benchmark_prompts("sks", "dog", live=True)[:3] for _ in range(2)]
    assert result["counts"] == {"real": 4, "generated": 6, "class_generated": 2, "prompts": 3}
    assert result["benchmark"]["live"] and result["benchmark"]["class_noun"] == "dog"
    assert set(METRICS) <= set(result)
    capsys.readouterr()

    sample.main(["--ckpt", str(WORLD_SD), "--prompt", prompts["00002.png"], "--n_samples", "2", "--ddim_steps", "1",
                 "--H", "32", "--W", "32", "--outdir", str(tmp_path / "sample")])
    for ours, theirs in (("00002.png", "00000.png"), ("00003.png", "00001.png")):
        assert (Image.open(outdir / "samples" / ours).tobytes()
                == Image.open(tmp_path / "sample" / "samples" / theirs).tobytes())

    again = tmp_path / "again.json"
    assert evaluate.main(score_argv(again, real=subject, generated=outdir / "samples", class_generated=outdir / "class_samples",
                                    extra=["--precision", "fp32"])) == 0
    rescored = json.loads(again.read_text())
    assert all(rescored[k] == result[k] for k in METRICS)

    assert evaluate.main(argv) == 2                               # the folder holds images now: refused
    assert "holds images already" in capsys.readouterr().err


def test_benchmark_bad_input_before_any_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(benchmark, "generate_images", lambda *a, **k: pytest.fail("a model was loaded"))
    base = ["benchmark", "--model", str(WORLD_SD), "--subject", str(EVAL / "real"), "--dino", str(DINO["hf"]),
            "--clip", str(CLIP), "--outdir", str(tmp_path / "out")]
    cases = [([], "--class_noun: needed"),
             (["--class_noun", "dog", "--model", str(tmp_path / "nowhere")], "--model .*: no such file or folder"),
             (["--class_noun", "dog", "--dino", str(FIX / "vit" / "hf_classifier")], "--dino .*a ViT classifier"),
             (["--class_noun", "dog", "--clip", str(FIX / "clip_model" / "b32_text")], "--clip .*text tower only"),
             (["--class_noun", "dog", "--H", "40"], "--H=40: must be a positive multiple of 16"),
             (["--class_noun", "dog", "--images_per_prompt", "0"], "--images_per_prompt 0: must be >= 1")]
    for extra, words in cases:
        assert evaluate.main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and re.search(words, err), (extra, err)


# ---- models from the Hugging Face cache ----------------------------------------------------------------
def _cache_repo(cache: Path, repo_id: str, folder: Path, *, pickled: bool = False) -> None:
    """`folder` as huggingface_hub keeps a download (tests/fixtures/hub proves the layout with its own
    functions): blobs named by hash, refs/main naming the commit, snapshots/<commit>/ links into blobs/.
    `pickled`: the weights as pytorch_model.bin only, as repos from before safetensors hold them."""
    import hashlib
    import torch
    from safetensors.torch import load_file
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for file in sorted(folder.iterdir()):
        name, data = file.name, file.read_bytes()
        if pickled and name == "model.safetensors":
            torch.save(load_file(str(file)), tmp := cache / "weights.bin")
            name, data = "pytorch_model.bin", tmp.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(Path("../../blobs") / blob.name)


def test_dino_and_clip_from_repo_ids_in_the_cache(tmp_path, monkeypatch, capsys):
    """--dino/--clip take repo ids as transformers users type them, read from the local cache; a DINO repo
    with only a pickle (facebook/dino-vits16 had no safetensors on its main branch) reads through the
    restricted unpickler: the same numbers as the folders."""
    cache = tmp_path / "hub"
    _cache_repo(cache, "facebook/dino-vits16", DINO["hf"], pickled=True)
    _cache_repo(cache, "openai/clip-vit-large-patch14", CLIP)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    folders, repos = tmp_path / "folders.json", tmp_path / "repos.json"
    extra = ["--precision", "fp32"]
    assert evaluate.main(score_argv(folders, extra=extra)) == 0
    assert evaluate.main(score_argv(repos, dino="facebook/dino-vits16", clip="openai/clip-vit-large-patch14",
                                    extra=extra)) == 0
    a, b = json.loads(folders.read_text()), json.loads(repos.read_text())
    assert [a[k] for k in METRICS] == [b[k] for k in METRICS]
    assert "restricted unpickler" in capsys.readouterr().err
    assert evaluate.main(score_argv(repos, dino="facebook/dino-vitb16", extra=extra)) == 2
    assert "facebook/dino-vitb16" in capsys.readouterr().err.splitlines()[-1]
