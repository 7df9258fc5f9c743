"""Repo ids read from the local Hugging Face cache (common/hub_cache.py), never from the network.

tests/fixtures/hub/cache is a cache laid out by huggingface_hub's own functions (tools/make_reference_hub_cache.py):
tiny-org/tiny-sd (main: tests/fixtures/sd/tiny_diffusers, an fp16 VAE variant and the single file; v0.1: a partial
snapshot), tiny-org/tiny-vit (main: sharded by transformers; the branch `pickle`: pytorch_model.bin only, its blob
in the shared store) and tiny-org/tiny-lora. reference.json holds huggingface_hub's own answers about it, which our
resolver must give too; every model flag must give from a repo id what it gives from the plain folder.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
from pathlib import Path

import pytest
import torch

import predict_emotion
import sample
import train_dreambooth
from common.hub_cache import HubCacheError, cache_folder, lookup, parse_repo_path, resolve_model
from common.state_dict import CheckpointError, read_safetensors, write_safetensors
from diffusion.checkpoints.load import load_stable_diffusion
from diffusion.checkpoints.lora_files import lora_weights_file

FIXTURES = Path(__file__).parent / "fixtures"
HUB = FIXTURES / "hub"
CACHE = HUB / "cache"
REFERENCE = json.loads((HUB / "reference.json").read_text())
COMMITS = REFERENCE["commits"]
SD, SINGLE = FIXTURES / "sd" / "tiny_diffusers", FIXTURES / "sd" / "tiny_single.safetensors"
VIT = FIXTURES / "vit" / "hf_classifier"
LORA = FIXTURES / "lora" / "trained" / "pytorch_lora_weights.safetensors"
SD_MAIN = CACHE / "models--tiny-org--tiny-sd" / "snapshots" / COMMITS["tiny-org/tiny-sd@main"]
HF_VARIABLES = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def hub_cache(monkeypatch):
    for name in HF_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(CACHE))


@pytest.fixture
def copied_cache(tmp_path, monkeypatch) -> Path:
    """A copy of the cache (links kept as links) to damage."""
    cache = tmp_path / "cache"
    shutil.copytree(CACHE, cache, symlinks=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


# ---- the cache as huggingface_hub lays it out and reads it ------------------------------------------------
@pytest.mark.parametrize("case", REFERENCE["cache_folders"], ids=lambda c: ",".join(sorted(c["env"])))
def test_the_cache_folder_is_the_one_huggingface_hub_picks(case, monkeypatch):
    for name in (*HF_VARIABLES, "BASE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in case["env"].items():
        monkeypatch.setenv(name, value)
    assert str(cache_folder()[0]) == case["cache"]


def test_every_lookup_answers_as_try_to_load_from_cache():
    """huggingface_hub's try_to_load_from_cache on every file of every revision (by ref and by commit), absent
    files, a `.no_exist` entry and an uncached revision: our lookup finds the same path, or refuses."""
    assert len(REFERENCE["lookups"]) > 100
    for case in REFERENCE["lookups"]:
        expected = case["found"] if case["found"] != "no_exist" else None
        try:
            ours = lookup(case["repo_id"], case["revision"], case["file"]).relative_to(CACHE).as_posix()
        except HubCacheError:
            ours = None
        assert ours == expected, case


def test_every_revision_scan_cache_dir_sees_is_a_snapshot_we_resolve():
    for repo_id, revisions in REFERENCE["scan"].items():
        for commit, revision in revisions.items():
            for name in [commit, *revision["refs"]]:
                snapshot = resolve_model(f"{repo_id}@{name}")
                assert snapshot == CACHE / f"models--{repo_id.replace('/', '--')}" / "snapshots" / commit
                files = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if not p.is_dir())
                assert files == revision["files"]


@pytest.mark.parametrize("text, expected", [
    ("org/name", ("org/name", None, "")),
    ("org/name@v1.0", ("org/name", "v1.0", "")),
    ("org/name/unet/config.json", ("org/name", None, "unet/config.json")),
    ("org/name@main/v1-5-pruned-emaonly.safetensors", ("org/name", "main", "v1-5-pruned-emaonly.safetensors")),
    ("org/name@refs/pr/3/unet/config.json", ("org/name", "refs/pr/3", "unet/config.json")),
    ("org/name/file@2.txt", ("org/name", None, "file@2.txt")),           # an @ past the repo id is a file's
    ("org/name@feature%2Fx", ("org/name", "feature/x", "")),               # a quoted "/" in a revision
    ("hf://org/name@v2", ("org/name", "v2", "")),
    ("hf://models/org/name", ("org/name", None, "")),
    ("no-such-model", None), ("a/b--c", None), ("a/..", None), ("../x/y", None), ("org/na me", None),
    ("org/name.git", None), ("-org/name", None),
])
def test_repo_ids_split_as_huggingface_hub_splits_them(text, expected):
    got = parse_repo_path(text)
    assert (None if got is None else (got.repo_id, got.revision, got.path_in_repo)) == expected


def test_resolving_a_resolved_value_gives_it_back():
    """Scripts record the resolved path with the flags as given (run_config.toml): repeating the run resolves again."""
    for value, flags in [("tiny-org/tiny-sd", {"weights_name": "tiny_single.safetensors"}),
                         ("tiny-org/tiny-sd@v0.1", {"revision": "v0.1"}), ("tiny-org/tiny-lora", {})]:
        once = resolve_model(value, **flags)
        assert resolve_model(str(once), **flags) == once


# ---- refusals: one line each, naming what to do ------------------------------------------------------------
@pytest.mark.parametrize("value, revision, pattern", [
    ("tiny-org/tiny-sd/../../../etc/passwd", None, r"refused: the path '\.\./\.\./\.\./etc/passwd' of tiny-org/tiny-sd"),
    ("tiny-org/tiny-sd//etc/passwd", None, r"refused: the path '/etc/passwd'"),
    ("tiny-org/tiny-sd@../../blobs", None, r"refused: the revision '\.\.'"),
    ("tiny-org/tiny-sd", "../../../x", r"refused: the revision '\.\./\.\./\.\./x'"),
    ("no-such-model", None, r"no such file or folder, and not a repo id of the Hugging Face cache \(org/name"),
    ("tiny-org/tiny-sd@v0.1", "main", r"the revision @v0.1 in the repo id and --revision main disagree"),
])
def test_bad_repo_ids_are_refused_by_name(value, revision, pattern):
    with pytest.raises(HubCacheError, match=pattern) as error:
        resolve_model(value, flag="--ckpt", revision=revision)
    assert str(error.value).startswith(f"--ckpt {value}: ") and "\n" not in str(error.value)


def test_a_repo_not_in_the_cache_names_it_the_cache_and_the_download_command():
    with pytest.raises(HubCacheError) as error:
        resolve_model("other-org/missing@v2", flag="--model")
    message = str(error.value)
    assert "\n" not in message
    for part in ("--model other-org/missing@v2: no such file or folder, and other-org/missing is not in the Hugging "
                 f"Face cache (looked in {CACHE}, $HF_HUB_CACHE)", "`hf download other-org/missing --revision v2`",
                 "huggingface-cli download", "models--other-org--missing"):
        assert part in message, message
    with pytest.raises(HubCacheError, match="it holds models--tiny-org--tiny-sd: repo ids are case-sensitive"):
        resolve_model("Tiny-Org/Tiny-SD")


@pytest.mark.parametrize("script", ["sample", "predict_emotion", "serve_emotion", "train_emotion", "train_dreambooth",
                                    "porting", "score"])
def test_every_script_refuses_a_repo_not_in_the_cache_in_one_line(script, tmp_path, capsys):
    import serve_emotion
    import train_emotion
    from porting.__main__ import main as porting
    from world.dreambooth_demo import score_main
    missing, flag = "tiny-org/not-here", {"porting": "--model", "score": "MODEL", "sample": "--ckpt",
                                          "train_emotion": "--pretrained_model_name_or_path",
                                          "train_dreambooth": "--pretrained_model_name_or_path"}.get(script, "--model")
    runs = {"sample": lambda: sample.main(["--ckpt", missing, "--outdir", str(tmp_path)]),
            "predict_emotion": lambda: predict_emotion.main(["--model", missing, str(FIXTURES / "images")]),
            "serve_emotion": lambda: serve_emotion.main(["--model", missing, "--port", "0"]),
            "train_emotion": lambda: train_emotion.main(["--pretrained_model_name_or_path", missing, "--output_dir",
                                                         str(tmp_path / "out"), "--device", "cpu"]),
            "train_dreambooth": lambda: train_dreambooth.main([
                "--pretrained_model_name_or_path", missing, "--instance_data_dir", str(FIXTURES / "images"),
                "--instance_prompt", "a sks dog", "--output_dir", str(tmp_path / "out"), "--device", "cpu"]),
            "porting": lambda: porting(["trace", "--model", missing, "--component", "vit", "--inputs",
                                        str(FIXTURES / "traces" / "vit_inputs.safetensors"), "--out",
                                        str(tmp_path / "t.safetensors")]),
            "score": lambda: score_main([missing, "--out", str(tmp_path / "s")])}
    try:
        code, err = runs[script](), capsys.readouterr().err
    except SystemExit as e:            # sample.py raises its message
        code, err = 2, f"{e}\n"
    assert code == 2 and err.count("\n") == 1, err
    assert f"{flag} {missing}: no such file or folder, and {missing} is not in the Hugging Face cache" in err, err
    assert "hf download tiny-org/not-here" in err
    assert not (tmp_path / "out").exists() or script == "train_emotion"    # it makes --output_dir first, as before


def test_a_revision_not_in_the_cache_lists_those_that_are():
    main, old = COMMITS["tiny-org/tiny-sd@main"], COMMITS["tiny-org/tiny-sd@v0.1"]
    with pytest.raises(HubCacheError) as error:
        resolve_model("tiny-org/tiny-sd@v2")
    assert (f"revision v2 of tiny-org/tiny-sd is not in the Hugging Face cache" in str(error.value)
            and f"cached: main -> {main[:12]}, v0.1 -> {old[:12]}" in str(error.value)
            and "`hf download tiny-org/tiny-sd --revision v2`" in str(error.value)), error.value
    with pytest.raises(HubCacheError, match=f"commit {'0' * 40}: no file of it is in the Hugging Face cache"):
        resolve_model(f"tiny-org/tiny-sd@{'0' * 40}")
    assert resolve_model(f"tiny-org/tiny-sd@{old}") == resolve_model("tiny-org/tiny-sd", revision="v0.1")


def test_a_file_missing_from_a_partial_snapshot_is_named_with_the_snapshot(capsys):
    old = COMMITS["tiny-org/tiny-sd@v0.1"]
    snapshot = CACHE / "models--tiny-org--tiny-sd" / "snapshots" / old
    with pytest.raises(HubCacheError) as error:
        resolve_model("tiny-org/tiny-sd@v0.1/vae/config.json")
    assert (f"{snapshot}/vae/config.json: not in the Hugging Face cache, which holds only some of tiny-org/tiny-sd's "
            f"files at commit {old} ({snapshot} holds: model_index.json, unet/)") in str(error.value)
    assert "`hf download tiny-org/tiny-sd vae/config.json --revision v0.1`" in str(error.value)
    with pytest.raises(HubCacheError, match="the Hub said that tiny-org/tiny-sd has no file text_encoder/model.fp16"):
        resolve_model("tiny-org/tiny-sd/text_encoder/model.fp16.safetensors")
    # the whole partial snapshot resolves; what a script then misses is named in it, with how to fetch it
    with pytest.raises(SystemExit) as error:
        sample.main(["--ckpt", "tiny-org/tiny-sd@v0.1", "--outdir", "unused"])
    assert (f"--ckpt {snapshot}: no vae/config.json (a partial download: the Hugging Face cache holds only some of "
            f"tiny-org/tiny-sd's files at commit {old}; on a connected machine run `hf download tiny-org/tiny-sd "
            f"--revision {old}`)") in str(error.value)
    with pytest.raises(CheckpointError, match=rf"{snapshot}/vae: no diffusion_pytorch_model.safetensors in this folder "
                                              rf".*`hf download tiny-org/tiny-sd --include 'vae/\*' --revision {old}`"):
        load_stable_diffusion(snapshot)


def test_a_broken_link_names_its_blob_and_the_interrupted_download(copied_cache):
    link = copied_cache / SD_MAIN.relative_to(CACHE) / "vae" / "diffusion_pytorch_model.fp16.safetensors"
    blob = Path(os.path.normpath(link.parent / os.readlink(link)))
    blob.unlink()
    with pytest.raises(HubCacheError) as error:
        resolve_model("tiny-org/tiny-sd", flag="--ckpt")
    assert f"{link}: a broken link in the Hugging Face cache: its blob {blob} is missing." in str(error.value)
    assert "`hf download tiny-org/tiny-sd` again" in str(error.value)
    Path(f"{blob}.incomplete").write_bytes(b"half a file")
    with pytest.raises(HubCacheError, match=f"{blob.name}.incomplete beside it is what an interrupted download left"):
        resolve_model("tiny-org/tiny-sd")
    assert resolve_model("tiny-org/tiny-sd/unet") == copied_cache / SD_MAIN.relative_to(CACHE) / "unet"  # intact
    # the shared store: snapshot -> blobs/<sha256> -> <cache>/blobs/<xx>/<hash>; the last link's target is named
    shared = next((copied_cache / "blobs").glob("*/" + "[0-9a-f]" * 64))
    shared.chmod(0o600)
    shared.unlink()
    with pytest.raises(HubCacheError, match=f"its blob {shared} is missing"):
        resolve_model("tiny-org/tiny-vit@pickle")


# ---- every model flag: the same results from a repo id as from the plain folder ---------------------------------
def _sample(tmp_path: Path, name: str, *argv: str) -> list[bytes]:
    written = sample.main(["--outdir", str(tmp_path / name), "--prompt", "a cat", "--n_samples", "1",
                           "--ddim_steps", "2", "--H", "32", "--W", "32", "--device", "cpu", *argv])
    return [p.read_bytes() for p in written]


def test_sample_py_from_the_cache_equals_the_plain_folder_byte_for_byte(tmp_path):
    folder = _sample(tmp_path, "folder", "--ckpt", str(SD))
    assert _sample(tmp_path, "repo", "--ckpt", "tiny-org/tiny-sd") == folder
    assert _sample(tmp_path, "main", "--ckpt", "tiny-org/tiny-sd", "--revision", "main") == folder
    single = _sample(tmp_path, "single", "--ckpt", str(SINGLE), "--config", str(SD))
    assert _sample(tmp_path, "file", "--ckpt", "tiny-org/tiny-sd/tiny_single.safetensors",
                   "--config", "tiny-org/tiny-sd") == single
    assert _sample(tmp_path, "weights_name", "--ckpt", "tiny-org/tiny-sd", "--weights_name",
                   "tiny_single.safetensors", "--config", "tiny-org/tiny-sd") == single
    lora = _sample(tmp_path, "lora_file", "--ckpt", str(SD), "--lora", f"{LORA}:0.7")
    assert _sample(tmp_path, "lora_repo", "--ckpt", "tiny-org/tiny-sd", "--lora", "tiny-org/tiny-lora:0.7") == lora
    assert lora != folder


def test_variant_files_are_the_ones_diffusers_reads():
    """--variant fp16, as DiffusionPipeline.from_pretrained(variant="fp16"): the VAE, which has an fp16 file, reads
    it; the UNet and text encoder, which have none, read their plain files (reference.json: what diffusers read)."""
    models = load_stable_diffusion(resolve_model("tiny-org/tiny-sd"), variant="fp16")
    assert {part: file.relative_to(SD_MAIN).as_posix() for part, file in models.files.items()} == \
        REFERENCE["variant_fp16_files"]
    fp16 = read_safetensors(SD_MAIN / REFERENCE["variant_fp16_files"]["vae"])
    assert torch.equal(models.vae.state_dict()["decoder.conv_out.weight"], fp16["decoder.conv_out.weight"].float())
    with pytest.raises(CheckpointError, match="--variant bf16: no component of this pipeline has bf16 files"):
        load_stable_diffusion(SD_MAIN, variant="bf16")
    with pytest.raises(SystemExit, match="--variant fp16: applies to a diffusers folder; --ckpt .*tiny_single"):
        sample.main(["--ckpt", "tiny-org/tiny-sd/tiny_single.safetensors", "--variant", "fp16"])


def _predict(capsys, model: str) -> tuple[list[dict], str]:
    assert predict_emotion.main(["--model", model, str(FIXTURES / "images")]) == 0
    out = capsys.readouterr()
    return [json.loads(line) for line in out.out.splitlines()], out.err


def test_predict_emotion_from_a_sharded_and_a_pickled_repo_gives_the_folder_scores(capsys):
    """The sharded repo: the same images, labels and scores within 1e-6. The pickled one, read by the restricted
    unpickler (said on stderr): the same weights bit for bit, and the scores the plain folder's model gives once its
    weights are copied out of the file's pages into fresh memory, as unpickled tensors are. Scores move by an ulp
    with where a mapped tensor starts: the folder's safetensors start 4 bytes past a 64-byte line here, and the CPU
    kernels take another vector path for them (1 ulp on one score, 3e-8; on an AVX2 CPU the sharded files' other
    offsets moved one score of the folder's by 3e-8 too)."""
    from common.images import load_image
    from vit.classifier import ImageClassifier
    from vit.weights import load_vit
    folder, _ = _predict(capsys, str(VIT))
    sharded, err = _predict(capsys, "tiny-org/tiny-vit")
    assert err == ""
    assert_same_scores(sharded, folder)
    pickled, err = _predict(capsys, "tiny-org/tiny-vit@pickle")
    assert "pytorch_model.bin: no safetensors weights here, so this pickle is read by the restricted unpickler" in err
    plain, pickle = load_vit(VIT).model.state_dict(), load_vit(resolve_model("tiny-org/tiny-vit@pickle")).model.state_dict()
    assert all(torch.equal(plain[k], pickle[k]) for k in plain)
    moved = ImageClassifier(VIT)
    for parameter in moved.model.parameters():
        parameter.data = parameter.data.clone()
    images = [load_image(line["image"]) for line in folder]
    batches = [moved.predict(images[i:i + 8], top_k=5) for i in range(0, len(images), 8)]   # predict_emotion's
    assert [line["predictions"] for line in pickled] == [p for batch in batches for p in batch]
    assert_same_scores(pickled, folder)


def assert_same_scores(lines: list[dict], expected: list[dict]) -> None:
    """predict_emotion's JSON lines: the same images and labels in the same order, each score within 1e-6."""
    assert [a["image"] for a in lines] == [b["image"] for b in expected]
    for a, b in zip(lines, expected, strict=True):
        assert [p["label"] for p in a["predictions"]] == [p["label"] for p in b["predictions"]]
        assert max(abs(p["score"] - q["score"]) for p, q in zip(a["predictions"], b["predictions"])) <= 1e-6


def test_train_emotion_and_the_porting_trace_read_repo_ids():
    from porting.components import load_component
    from porting.trace import trace
    from vit.emotion_steps import build_model
    plain, _ = build_model(str(VIT), labels=["sad", "disgust", "angry", "neutral", "fear", "surprise", "happy"],
                           preset="small", image_size=None)
    cached, _ = build_model("tiny-org/tiny-vit", labels=list(plain.config.labels), preset="small", image_size=None)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), cached.state_dict().values()))
    inputs = read_safetensors(FIXTURES / "traces" / "vit_inputs.safetensors")
    a, b = trace(load_component(VIT, "vit"), inputs), trace(load_component("tiny-org/tiny-vit", "vit"), inputs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(HubCacheError, match="--model tiny-org/nothing: no such file or folder, and tiny-org/nothing"):
        load_component("tiny-org/nothing", "unet")


def test_lora_folders_and_repos_pick_the_file_diffusers_would(tmp_path):
    assert lora_weights_file("tiny-org/tiny-lora").name == "pytorch_lora_weights.safetensors"
    (tmp_path / "a.safetensors").write_bytes(LORA.read_bytes())
    assert lora_weights_file(str(tmp_path)) == tmp_path / "a.safetensors"     # the only one: no name needed
    (tmp_path / "b.safetensors").write_bytes(LORA.read_bytes())
    with pytest.raises(ValueError, match=r"holds several LoRA files \(a.safetensors, b.safetensors\): name one"):
        lora_weights_file(str(tmp_path))


def test_train_dreambooth_from_a_repo_id_equals_the_folder(tmp_path):
    """The same run from the repo id and from the folder: the same UNet, the untrained parts copied through the
    snapshot's links; with --variant fp16 the VAE comes from (and is copied as) the fp16 file."""
    instance = tmp_path / "instance"
    instance.mkdir()
    from PIL import Image
    for i in range(2):
        Image.new("RGB", (16, 16), (40 * i, 90, 200)).save(instance / f"{i}.png")

    def run(name: str, model: str, *extra: str) -> Path:
        out = tmp_path / name
        assert train_dreambooth.main(["--pretrained_model_name_or_path", model, "--instance_data_dir", str(instance),
                                      "--instance_prompt", "a sks dog", "--resolution", "16", "--train_batch_size",
                                      "1", "--device", "cpu", "--max_train_steps", "1", "--output_dir", str(out),
                                      *extra]) == 0
        return out
    folder, repo = run("folder", str(SD)), run("repo", "tiny-org/tiny-sd", "--revision", "main")
    for file in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors", "tokenizer/vocab.json", "model_index.json"):
        assert (folder / file).read_bytes() == (repo / file).read_bytes(), file
        assert not (repo / file).is_symlink()
    assert json.loads((repo / "run_info.json").read_text())["argv"][1] == "tiny-org/tiny-sd"
    variant = run("variant", "tiny-org/tiny-sd", "--variant", "fp16")
    assert (variant / "vae/diffusion_pytorch_model.safetensors").read_bytes() == \
        (SD_MAIN / "vae/diffusion_pytorch_model.fp16.safetensors").read_bytes()


def test_dreambooth_demo_score_reads_repo_ids(tmp_path, capsys):
    from world.dreambooth_demo import score_main
    flags = ["--fidelity_seeds", "1", "--prior_seeds", "1", "--steps", "1"]
    assert score_main([str(SD), "--lora", str(LORA), "--out", str(tmp_path / "a"), *flags]) == 0
    assert score_main(["tiny-org/tiny-sd", "--lora", "tiny-org/tiny-lora", "--out", str(tmp_path / "b"), *flags]) == 0
    assert (tmp_path / "a" / "scores.json").read_text() == (tmp_path / "b" / "scores.json").read_text()
    assert score_main(["tiny-org/gone", "--out", str(tmp_path / "c")]) == 2
    assert "error: MODEL tiny-org/gone: no such file or folder, and tiny-org/gone is not in" in capsys.readouterr().err


def test_nothing_opens_a_socket(tmp_path, monkeypatch, capsys):
    """Resolving and loading from the cache, with every way to the network refused (HF_HUB_OFFLINE unset)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def refuse(*args, **kwargs):
        raise AssertionError("a socket was opened")
    for name in ("socket", "create_connection", "getaddrinfo", "socketpair"):
        monkeypatch.setattr(socket, name, refuse)
    assert _sample(tmp_path, "repo", "--ckpt", "tiny-org/tiny-sd", "--variant", "fp16", "--lora", "tiny-org/tiny-lora")
    capsys.readouterr()
    assert _predict(capsys, "tiny-org/tiny-vit@pickle")[0]
    with pytest.raises(SystemExit, match="not in the Hugging Face cache"):
        sample.main(["--ckpt", "tiny-org/elsewhere"])


# ---- sharded and pickled folders, local ones too -----------------------------------------------------------------
def _shard(folder: Path, name: str, index_name: str, parts: int = 2) -> None:
    """Split folder/name into shards and an index as transformers/diffusers write them."""
    tensors = read_safetensors(folder / name)
    keys = sorted(tensors)
    stem = name.removesuffix(".safetensors")
    weight_map = {}
    for k in range(parts):
        shard = f"{stem}-{k + 1:05d}-of-{parts:05d}.safetensors"
        chunk = {key: tensors[key].clone() for key in keys[k::parts]}
        write_safetensors(folder / shard, chunk, {"format": "pt"})
        weight_map.update({key: shard for key in chunk})
    (folder / index_name).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    (folder / name).unlink()


def test_a_sharded_local_diffusers_folder_loads_as_the_whole_one(tmp_path):
    folder = tmp_path / "sd"
    shutil.copytree(SD, folder)
    _shard(folder / "unet", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")
    _shard(folder / "text_encoder", "model.safetensors", "model.safetensors.index.json", parts=3)
    plain, sharded = load_stable_diffusion(SD), load_stable_diffusion(folder)
    assert sharded.files["unet"].name == "diffusion_pytorch_model.safetensors.index.json"
    for part in ("unet", "text_encoder"):
        a, b = getattr(plain, part).state_dict(), getattr(sharded, part).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), part
    index = folder / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    first = sorted(weight_map)[0]
    weight_map[first] = "../../elsewhere.safetensors"
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=f"tensor {re.escape(first)}: shard '../../elsewhere.safetensors' is not "
                                              "a file name beside the index"):
        load_stable_diffusion(folder)
    weight_map[first] = "diffusion_pytorch_model-00002-of-00002.safetensors"    # the tensor is in shard 1
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=rf"00001-of-00002.safetensors: does not hold what its index says: not in "
                                              rf"the index for it 1: {re.escape(first)}"):
        load_stable_diffusion(folder)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_shards_read_through_the_cache_stay_on_the_blobs_pages():
    index = resolve_model("tiny-org/tiny-vit/model.safetensors.index.json")
    tensors = read_safetensors(index)
    maps = [line.split() for line in Path("/proc/self/maps").read_text().splitlines()]
    blobs = {str(p.resolve()) for p in index.parent.glob("model-*.safetensors")}
    spans = [tuple(int(x, 16) for x in m[0].split("-")) for m in maps if m[-1] in blobs]
    assert len(blobs) == 3 and all(any(lo <= t.data_ptr() < hi for lo, hi in spans) for t in tensors.values()
                                   if t.numel())


def test_a_pickled_local_folder_is_read_by_the_restricted_unpickler(tmp_path, capsys):
    folder = tmp_path / "sd"
    shutil.copytree(SD, folder)
    vae = folder / "vae"
    torch.save(read_safetensors(vae / "diffusion_pytorch_model.safetensors"), vae / "diffusion_pytorch_model.bin")
    (vae / "diffusion_pytorch_model.safetensors").unlink()
    models = load_stable_diffusion(folder)
    assert models.files["vae"] == vae / "diffusion_pytorch_model.bin"
    assert "diffusion_pytorch_model.bin: no safetensors weights here, so this pickle is read" in capsys.readouterr().err
    plain = load_stable_diffusion(SD).vae.state_dict()
    assert all(torch.equal(plain[k], v) for k, v in models.vae.state_dict().items())
