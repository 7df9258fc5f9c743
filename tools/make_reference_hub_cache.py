"""Dev-only: a small Hugging Face cache laid out by huggingface_hub's own functions, from local fixture files,
with no network, for the tests of common/hub_cache.py (repo ids read from the cache).

    .venv-dev/bin/python tools/make_reference_hub_cache.py

Each file is "downloaded" as huggingface_hub's `_hf_hub_download_to_cache_dir` finishes a download: the
bytes written to blobs/<etag>.incomplete and moved into place (`_chmod_and_move`), refs/<revision> written
(`_cache_commit_hash_for_specific_revision`), the snapshot's relative symlink made (`_create_symlink`), the
CACHEDIR.TAG written; one blob is then published to the cache-wide shared store (`publish_blob_to_shared_store`,
as a Xet download is), and one `.no_exist` entry is made as a 404 from the Hub makes it. Etags are what the Hub
gives: sha256 of an LFS file (weights), git's blob sha1 of any other. Commits are fixed made-up hashes.

tests/fixtures/hub/cache/ (what HF_HUB_CACHE points at in the tests):
- tiny-org/tiny-sd, main: tests/fixtures/sd/tiny_diffusers (the same bytes: git stores them once), its VAE's
  fp16 variant as diffusers' save_pretrained(variant="fp16") writes it, and tiny_single.safetensors at the root
  (a repo publishing both layouts, as runwayml/stable-diffusion-v1-5); `.no_exist` for text_encoder/model.fp16.safetensors.
  v0.1 (a tag, an older commit): only model_index.json and unet/ (a partial download, allow_patterns).
- tiny-org/tiny-vit, main: tests/fixtures/vit/hf_classifier saved sharded by transformers' save_pretrained
  (model.safetensors.index.json + shards); the branch `pickle`: the same weights as pytorch_model.bin only.
  The .bin's blob sits in the shared store (snapshot -> blobs/<sha256> -> <cache>/blobs/<xx>/<hash>).
- tiny-org/tiny-lora, main: tests/fixtures/lora/trained's two LoRA files.

tests/fixtures/hub/reference.json: huggingface_hub's answers, which the tests hold our resolver to:
try_to_load_from_cache for every file of every revision (and a few absent ones), scan_cache_dir's view of the
cache, the cache folder huggingface_hub.constants picks under several environments, and which file of each
component diffusers' DiffusionPipeline.from_pretrained(variant="fp16") read. The script also loads the cached
repos by repo id, offline, in diffusers and transformers, and checks they give what the plain folders give.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"               # belt and braces: socket.socket is refused below too

import torch  # noqa: E402
from huggingface_hub import scan_cache_dir, try_to_load_from_cache  # noqa: E402
from huggingface_hub._local_folder import _create_cachedir_tag  # noqa: E402
from huggingface_hub.file_download import (_CACHED_NO_EXIST, _cache_commit_hash_for_specific_revision,  # noqa: E402
                                           _chmod_and_move, _create_symlink, _get_pointer_path, repo_folder_name)
from huggingface_hub.utils._shared_blobs import publish_blob_to_shared_store  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
FIXTURES = ROOT / "tests" / "fixtures"
OUT = FIXTURES / "hub"
CACHE = OUT / "cache"
SD, SINGLE = FIXTURES / "sd" / "tiny_diffusers", FIXTURES / "sd" / "tiny_single.safetensors"
VIT, LORA = FIXTURES / "vit" / "hf_classifier", FIXTURES / "lora" / "trained"
LFS_SUFFIXES = (".safetensors", ".bin")


def commit_of(label: str) -> str:
    return hashlib.sha1(f"tests/fixtures/hub {label}".encode()).hexdigest()


COMMITS = {("tiny-org/tiny-sd", "main"): commit_of("tiny-sd main"), ("tiny-org/tiny-sd", "v0.1"): commit_of("tiny-sd v0.1"),
           ("tiny-org/tiny-vit", "main"): commit_of("tiny-vit main"),
           ("tiny-org/tiny-vit", "pickle"): commit_of("tiny-vit pickle"),
           ("tiny-org/tiny-lora", "main"): commit_of("tiny-lora main")}


def no_network(*args, **kwargs):
    raise AssertionError("the fixture is made without the network")


def etag(filename: str, content: bytes) -> str:
    """What the Hub's ETag is: an LFS file's sha256, any other file's git blob sha1."""
    if filename.endswith(LFS_SUFFIXES):
        return hashlib.sha256(content).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def download(repo_id: str, revision: str, filename: str, content: bytes, *, shared: bool = False) -> None:
    """One file into the cache, as `_hf_hub_download_to_cache_dir` ends a download of it."""
    commit = COMMITS[repo_id, revision]
    storage = CACHE / repo_folder_name(repo_id=repo_id, repo_type="model")
    blob = storage / "blobs" / etag(filename, content)
    pointer = Path(_get_pointer_path(str(storage), commit, os.path.join(*filename.split("/"))))
    blob.parent.mkdir(parents=True, exist_ok=True)
    pointer.parent.mkdir(parents=True, exist_ok=True)
    _create_cachedir_tag(CACHE)
    _cache_commit_hash_for_specific_revision(str(storage), revision, commit)
    if not blob.exists():
        incomplete = Path(f"{blob}.incomplete")
        incomplete.write_bytes(content)
        _chmod_and_move(incomplete, blob)
        if shared:   # a Xet download: its bytes move to the cache-wide store, the repo blob links there
            xet_hash = hashlib.blake2b(content, digest_size=32).hexdigest()   # stands in for the Xet hash
            assert publish_blob_to_shared_store(blob_path=str(blob), xet_hash=xet_hash, cache_dir=CACHE,
                                                expected_size=len(content))
    if not pointer.exists():
        _create_symlink(str(blob), str(pointer), new_blob=True)


def no_exist(repo_id: str, revision: str, filename: str) -> None:
    """What a 404 from the Hub leaves: .no_exist/<commit>/<file> (file_download._get_metadata_or_catch_error)."""
    path = CACHE / repo_folder_name(repo_id=repo_id, repo_type="model") / ".no_exist" / COMMITS[repo_id, revision] / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- the repos ---------------------------------------------------------------------------------------------
def vae_fp16_variant() -> bytes:
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(SD / "vae").to(torch.float16)
    with tempfile.TemporaryDirectory() as tmp:
        vae.save_pretrained(tmp, variant="fp16")
        return (Path(tmp) / "diffusion_pytorch_model.fp16.safetensors").read_bytes()


def vit_sharded() -> dict[str, bytes]:
    from transformers import ViTForImageClassification
    model = ViTForImageClassification.from_pretrained(VIT)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, max_shard_size="40KB")
        files = files_of(Path(tmp))
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files, sorted(files)
    files.pop("config.json")       # the repo's own config (transformers would rewrite its version field)
    return {**files, "config.json": (VIT / "config.json").read_bytes(),
            "preprocessor_config.json": (VIT / "preprocessor_config.json").read_bytes()}


def vit_pickle() -> bytes:
    """pytorch_model.bin as transformers 4's save_pretrained(safe_serialization=False) wrote it: torch.save of
    the state dict (deterministic bytes)."""
    from safetensors.torch import load_file
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(load_file(VIT / "model.safetensors"), Path(tmp) / "pytorch_model.bin")
        return (Path(tmp) / "pytorch_model.bin").read_bytes()


def build() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    CACHE.mkdir(parents=True)
    sd = files_of(SD)
    for name, content in {**sd, "vae/diffusion_pytorch_model.fp16.safetensors": vae_fp16_variant(),
                          "tiny_single.safetensors": SINGLE.read_bytes()}.items():
        download("tiny-org/tiny-sd", "main", name, content)
    no_exist("tiny-org/tiny-sd", "main", "text_encoder/model.fp16.safetensors")
    for name in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"):
        download("tiny-org/tiny-sd", "v0.1", name, sd[name])
    for name, content in vit_sharded().items():
        download("tiny-org/tiny-vit", "main", name, content)
    for name in ("config.json", "preprocessor_config.json"):
        download("tiny-org/tiny-vit", "pickle", name, (VIT / name).read_bytes())
    download("tiny-org/tiny-vit", "pickle", "pytorch_model.bin", vit_pickle(), shared=True)
    for name, content in files_of(LORA).items():
        download("tiny-org/tiny-lora", "main", name, content)


# ---- what huggingface_hub, diffusers and transformers make of it -----------------------------------------------
def scan() -> dict:
    info = scan_cache_dir(CACHE)
    assert not info.warnings, info.warnings
    return {repo.repo_id: {rev.commit_hash: {"refs": sorted(rev.refs), "files": sorted(
        f.file_path.relative_to(rev.snapshot_path).as_posix() for f in rev.files)} for rev in repo.revisions}
        for repo in sorted(info.repos, key=lambda r: r.repo_id)}


def lookups(scanned: dict) -> list[dict]:
    """try_to_load_from_cache for every file any revision of a repo has, at every revision (by ref and by
    commit), a file no revision has, and a revision that is not cached."""
    out = []
    for repo_id, revisions in scanned.items():
        names = sorted({f for rev in revisions.values() for f in rev["files"]} | {"no_such_file.json"}
                       | ({"text_encoder/model.fp16.safetensors"} if repo_id.endswith("tiny-sd") else set()))
        asked = [ref for rev in revisions.values() for ref in rev["refs"]] + list(revisions) + ["v9"]
        for revision in asked:
            for name in names:
                found = try_to_load_from_cache(repo_id, name, cache_dir=CACHE, revision=revision)
                answer = ("no_exist" if found is _CACHED_NO_EXIST else
                          None if found is None else Path(found).relative_to(CACHE).as_posix())
                out.append({"repo_id": repo_id, "revision": revision, "file": name, "found": answer})
    return out


ENVIRONMENTS = [{}, {"XDG_CACHE_HOME": "/xdg"}, {"HF_HOME": "/hf-home", "XDG_CACHE_HOME": "/xdg"},
                {"HUGGINGFACE_HUB_CACHE": "/legacy-hub", "HF_HOME": "/hf-home"},
                {"HF_HUB_CACHE": "/hub", "HUGGINGFACE_HUB_CACHE": "/legacy-hub", "HF_HOME": "/hf-home"},
                {"HF_HOME": "~/hf"}, {"HF_HUB_CACHE": "$BASE/hub", "BASE": "/base"},
                {"XDG_CACHE_HOME": "~/xdg"}]


def cache_folders() -> list[dict]:
    """huggingface_hub.constants.HF_HUB_CACHE under each environment (HOME=/home/user), in a fresh process."""
    out = []
    for env in ENVIRONMENTS:
        full = {"PATH": os.environ["PATH"], "HOME": "/home/user", **env}
        run = subprocess.run([sys.executable, "-c", "import huggingface_hub.constants as c; print(c.HF_HUB_CACHE)"],
                             env=full, capture_output=True, text=True, check=True)
        out.append({"env": {"HOME": "/home/user", **env}, "cache": run.stdout.strip()})
    return out


def variant_files() -> dict[str, str]:
    """The file of each component that diffusers read with variant="fp16", told apart by the weights."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file
    pipe = StableDiffusionPipeline.from_pretrained("tiny-org/tiny-sd", cache_dir=CACHE, variant="fp16",
                                                   local_files_only=True, safety_checker=None)
    snapshot = CACHE / "models--tiny-org--tiny-sd" / "snapshots" / COMMITS["tiny-org/tiny-sd", "main"]
    out = {}
    for part in ("unet", "vae", "text_encoder"):
        model_state = getattr(pipe, part).state_dict()
        matches = []
        for file in sorted((snapshot / part).glob("*.safetensors")):
            tensors = load_file(file)
            if all(torch.equal(model_state[k].float(), v.float()) for k, v in tensors.items() if k in model_state):
                matches.append(file.relative_to(snapshot).as_posix())
        assert len(matches) == 1, (part, matches)
        out[part] = matches[0]
    assert out["vae"].endswith(".fp16.safetensors") and not out["unet"].endswith(".fp16.safetensors"), out
    return out


def check_libraries_read_the_repos() -> None:
    """By repo id, offline: diffusers' pipeline equals the plain folder's; transformers reads the sharded
    main and the pickled branch of the ViT to the plain folder's logits."""
    from diffusers import StableDiffusionPipeline
    from transformers import ViTForImageClassification
    cached = StableDiffusionPipeline.from_pretrained("tiny-org/tiny-sd", cache_dir=CACHE, local_files_only=True)
    plain = StableDiffusionPipeline.from_pretrained(SD)
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(cached, part).state_dict(), getattr(plain, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reference = ViTForImageClassification.from_pretrained(VIT).eval()(x).logits
    for revision in ("main", "pickle"):
        model = ViTForImageClassification.from_pretrained("tiny-org/tiny-vit", revision=revision, cache_dir=CACHE,
                                                          local_files_only=True).eval()
        assert torch.equal(model(x).logits, reference), revision


def check_ours(reference: dict) -> None:
    """Our resolver answers as huggingface_hub did (the tests check the same; this stops a bad regeneration)."""
    from common.hub_cache import HubCacheError, lookup
    os.environ["HF_HUB_CACHE"] = str(CACHE)
    for case in reference["lookups"]:
        try:
            ours = lookup(case["repo_id"], case["revision"], case["file"]).relative_to(CACHE).as_posix()
        except HubCacheError:
            ours = None
        assert ours == (case["found"] if case["found"] != "no_exist" else None), (case, ours)


def main() -> None:
    socket.socket = no_network
    socket.create_connection = no_network
    build()
    scanned = scan()
    reference = {"scan": scanned, "lookups": lookups(scanned), "cache_folders": cache_folders(),
                 "variant_fp16_files": variant_files(), "commits": {f"{r}@{v}": c for (r, v), c in COMMITS.items()}}
    check_libraries_read_the_repos()
    check_ours(reference)
    (OUT / "reference.json").write_text(json.dumps(reference, indent=1, sort_keys=True) + "\n")
    size = sum(p.stat().st_size for p in CACHE.rglob("*") if p.is_file() and not p.is_symlink())
    print(f"wrote {CACHE} ({size / 1e3:.0f} kB of blobs) and {OUT / 'reference.json'} "
          f"({len(reference['lookups'])} lookups)")


if __name__ == "__main__":
    main()
