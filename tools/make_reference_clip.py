"""Dev-only: make the CLIP tokenizer/text-encoder fixtures and manifests with transformers (and diffusers).

    .venv-dev/bin/python tools/make_reference_clip.py

Writes, under tests/fixtures/clip/:
  tokenizer_reference.json     >= 250 nasty prompts and transformers' ids (padded to 77 and unpadded)
                               and token strings, plus the ids of two other folder configurations
  tokenizer_sd_v1/             tokenizer_config.json + special_tokens_map.json as SD v1's tokenizer/
                               folder has them. Its vocab.json (1 MB) and merges.txt (0.5 MB) are not
                               committed: the tests write them from the shipped vocabulary.
  tokenizer_pad_bang/          a tokenizer_config.json padding with "!" (id 0), as SD 2.x's does
  text_encoder/                a tiny random CLIPTextModel as SD v1's text_encoder/ folder holds it:
                               config.json (legacy eos_token_id 2) + model.safetensors (text_model.* keys)
  sd_v1_single_file.safetensors  the same tensors under cond_stage_model.transformer.text_model.*,
                               beside two stand-in UNet/VAE tensors, as in an original SD v1 file
  clip_model/                  a tiny full CLIPModel (text + vision) whose text half is the same
  reference_outputs.safetensors  input ids and transformers' outputs for them
and tests/manifests/clip_*.json: every tensor name and shape of the real openai/clip-vit-large-patch14
text tower as an SD v1 folder and an SD v1 single file hold it, and of the full CLIPModel file.

The vocabulary files are rebuilt from open_clip's copy of OpenAI's merges with open_clip's own byte
table, independently of clip/tokenizer.py, so the tests check our construction against this one.
"""
from __future__ import annotations

import gzip
import json
import random
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "clip"
MANIFESTS = ROOT / "tests" / "manifests"

# ---------------------------------------------------------------------------------------------------
# Prompts: hand-written cases (one concern each), then seeded random mixes that cross the concerns.
# Lone surrogates are left out: neither tokenizer can encode them as UTF-8.
LONG = ("a highly detailed matte painting of a cozy cottage in a misty forest at dawn, volumetric light, "
        "by greg rutkowski and alphonse mucha, trending on artstation, 8k, octane render, unreal engine, "
        "intricate, elegant, sharp focus, illustration, concept art, smooth, digital painting, "
        "cinematic lighting, golden hour, ultra realistic, hyperdetailed, award winning photograph, "
        "masterpiece, best quality, extremely detailed, 35mm film grain, bokeh, f/1.8, iso 100")
HAND_WRITTEN = [
    # plain and SD-typical
    "a photo of a cat", "a photo of sks dog", "A PHOTO OF SKS DOG", "a photo of sks dog in a bucket",
    "(masterpiece:1.2), best quality, (((sks dog))), [blurry]", "<lora:sks_dog:0.8> a dog", "a dog BREAK a cat",
    "portrait of a woman, by Greg Rutkowski", "low quality, worst quality, jpeg artifacts, watermark",
    # empty and whitespace only
    "", " ", "   ", "\t", "\n", "\r\n", " \t \n ", "\u00a0", "\u3000", "\u2003\u2009", "\u200b", "\ufeff",
    # whitespace inside
    "a\tdog", "a\ndog", "a\r\ndog", "line one\n\nline two", "  leading spaces", "trailing spaces   ",
    "many     spaces     between", "a\u00a0dog", "a\u3000dog", "tab\tand\ttab\t", "\x0bvertical\x0ctab",
    # accents, decomposed forms, case oddities, compatibility characters
    "café", "cafe\u0301", "naïve résumé", "Zoë Saldaña", "ÅNGSTRÖM", "crème brûlée", "São Paulo", "Ærøskøbing",
    "Dvořák", "Łódź", "İstanbul", "STRASSE Straße ẞ", "ΣΊΣΥΦΟΣ and σοφός", "Ελληνικά", "Москва ночью",
    "привет, мир!", "Ünïcödé ñ", "e\u0301e\u0300e\u0302", "o\u0308\u0301", "ﬁne ﬂower ligatures",
    "Ａｂｃ full-width ＡＢＣ１２３", "ｓｋｓ ｄｏｇ", "№ 5", "ℌello ℕumbers", "½ ¾ ⅓", "x² + y³", "m/s²", "°C 25°",
    "µm vs μm",
    # emoji
    "🐶", "a 🐶 on the 🌕", "👩\u200d🚀 astronaut", "👍🏽 thumbs", "🇯🇵🇺🇸 flags", "❤️ heart", "🔥🔥🔥", "😀😃😄😁",
    "dog🐕dog", "🏳️\u200d🌈", "✨sparkles✨", "☕ coffee", "🤖 robot:", "emoji at end 🎉",
    # CJK and other scripts
    "一只可爱的小狗", "日本語のテキスト", "東京タワー at night", "한국어 문장", "漢字123かな", "中文，标点。", "ｶﾀｶﾅ half width",
    "犬と猫", "مرحبا بالعالم", "שלום עולם", "हिन्दी पाठ", "ภาษาไทย", "ქართული", "Ꭰ Cherokee", "𝔣𝔯𝔞𝔨𝔱𝔲𝔯", "𝐁𝐨𝐥𝐝 math",
    # punctuation runs
    "!!!", "...", "?!?!", "---", "(((masterpiece)))", "[[[x]]]", "{a|b|c}", "a,b,c", "a , b , c", "hello!!! world???",
    "$$$", "100%", "#hashtag @user", "e-mail: a@b.com", "http://example.com/a?b=c&d=e", "C:\\path\\to\\file",
    "quote \"inside\" here", "'single quotes'", "«guillemets»", "“smart quotes”", "‘curly’", "…ellipsis…", "—em dash—",
    "***bold***", "_under_score_", "a/b\\c|d", "<tag>", "</w>", "a</w>b", "~!@#$%^&*()_+`-={}|[]\\:\";'<>?,./",
    # numbers
    "1234567890", "3.14159", "1,000,000", "2x", "4k", "8k uhd", "1920x1080", "007", "-42", "1e10", "0.5", "v1.5",
    "model_v2_final_FINAL", "2023-01-01", "12:30pm", "#1", "1st 2nd 3rd 4th", "٣ Arabic-Indic digit", "四 and 4",
    # apostrophes and contractions
    "it's", "don't", "I'LL", "we've", "they're", "I'm", "she'd", "rock'n'roll", "dog's", "dogs'", "'s", "''",
    "it’s curly", "IT'S LOUD", "o'clock", "y'all'd've", "'tis", "l'amour", "can't won't shan't",
    # HTML entities (kept as text; OpenAI's ftfy path would unescape them)
    "&amp;", "&lt;b&gt;bold&lt;/b&gt;", "&#39;quoted&#39;", "&nbsp;", "Tom &amp; Jerry", "&quot;hi&quot;", "&#x1F436;",
    # control and unusual code points
    "\x00null", "bell\x07", "del\x7f", "esc\x1b[0m", "\u0085next line", "\u2028line sep", "\u2029para sep",
    "soft\u00adhyphen", "zero\u200bwidth", "rtl \u202eoverride", "\ufffd replacement", "\U000e0041 tag char",
    # special-token text
    "<|startoftext|>", "<|endoftext|>", "a <|endoftext|> b", "a<|startoftext|>b", "<|ENDOFTEXT|>",
    "<|StartOfText|> mixed", "<|endoftext|><|endoftext|>", "<|startoftext|>a photo<|endoftext|>", "<|endoftext",
    "|endoftext|>",
    # far past 77 tokens
    LONG, LONG.upper(), LONG + " " + LONG, "dog " * 100, "🐶" * 60, "一" * 120, "!" * 300, "a" * 500,
    " ".join(str(i) for i in range(200)), ", ".join(["masterpiece"] * 80),
]
INGREDIENTS = [
    "dog", "Cat", "SKS", "photo", "of", "a", "the", "it's", "don't", "I'LL", "café", "naïve", "🐶", "👩\u200d🚀", "🇯🇵",
    "東京", "犬", "한국", "Москва", "ΣΟΦΟΣ", "!!!", "...", "?", ",", "(", ")", "[", "]", ":1.2", "&amp;", "&lt;", "42",
    "3.14", "1920x1080", "\t", "\n", "  ", "\u00a0", "\u3000", "<|endoftext|>", "<|startoftext|>", "ﬁ", "Ａ", "x²",
    "\u200b", "e\u0301", "'s", "'", "’", "-", "_", "/", "#", "@", "%", "$", "😀", "✨", "<|STARTOFTEXT|>",
]


def random_prompts(n: int, *, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = [rng.choice(INGREDIENTS) for _ in range(rng.randint(1, 40))]
        out.append("".join(p + rng.choice(["", " ", " ", " ", "  ", "\t", ","]) for p in parts))
    return out


PROMPTS = HAND_WRITTEN + random_prompts(80)

# ---------------------------------------------------------------------------------------------------
# SD v1's tokenizer/ folder configuration (CompVis/stable-diffusion-v1-4, runwayml/stable-diffusion-v1-5).
_ADDED = {"__type": "AddedToken", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
SD_V1_TOKENIZER_CONFIG = {
    "add_prefix_space": False, "bos_token": {**_ADDED, "content": "<|startoftext|>"}, "do_lower_case": True,
    "eos_token": {**_ADDED, "content": "<|endoftext|>"}, "errors": "replace", "model_max_length": 77,
    "name_or_path": "openai/clip-vit-large-patch14", "pad_token": "<|endoftext|>",
    "special_tokens_map_file": "./special_tokens_map.json", "tokenizer_class": "CLIPTokenizer",
    "unk_token": {**_ADDED, "content": "<|endoftext|>"},
}
_MAPPED = {k: v for k, v in _ADDED.items() if k != "__type"}
SD_V1_SPECIAL_TOKENS_MAP = {
    "bos_token": {**_MAPPED, "content": "<|startoftext|>"}, "eos_token": {**_MAPPED, "content": "<|endoftext|>"},
    "pad_token": "<|endoftext|>", "unk_token": {**_MAPPED, "content": "<|endoftext|>"},
}
PAD_BANG_CONFIG = {**SD_V1_TOKENIZER_CONFIG, "pad_token": "!"}  # SD 2.x's tokenizer/ pads with "!" (id 0)


def write_vocab_files(folder: Path) -> None:
    """vocab.json + merges.txt from open_clip's copy of OpenAI's merges, built the way OpenAI's code does."""
    import open_clip.tokenizer as oct
    gz = Path(oct.__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
    merges = gzip.open(gz).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    chars = list(oct.bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def tokenizer_fixtures(tmp: Path) -> None:
    from transformers import CLIPTokenizer, CLIPTokenizerFast
    folders = {name: tmp / name for name in ("sd_v1", "bare", "pad_bang")}
    for folder in folders.values():
        folder.mkdir()
        write_vocab_files(folder)
    (folders["sd_v1"] / "tokenizer_config.json").write_text(json.dumps(SD_V1_TOKENIZER_CONFIG, indent=2))
    (folders["sd_v1"] / "special_tokens_map.json").write_text(json.dumps(SD_V1_SPECIAL_TOKENS_MAP, indent=2))
    (folders["pad_bang"] / "tokenizer_config.json").write_text(json.dumps(PAD_BANG_CONFIG, indent=2))

    slow, fast = CLIPTokenizer.from_pretrained(folders["sd_v1"]), CLIPTokenizerFast.from_pretrained(folders["sd_v1"])
    result = {"reference": f"transformers {__import__('transformers').__version__} CLIPTokenizer and CLIPTokenizerFast "
                           "(the same class in transformers 5) on SD v1's tokenizer/ folder",
              "prompts": PROMPTS}
    for name, tok in (("CLIPTokenizer", slow), ("CLIPTokenizerFast", fast)):
        padded = tok(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
        unpadded = tok(PROMPTS, truncation=True, max_length=77).input_ids
        tokens = [tok.tokenize(p) for p in PROMPTS]
        if name == "CLIPTokenizer":
            result.update(input_ids_padded=padded, input_ids_unpadded=unpadded, tokens=tokens)
        else:
            assert (padded, unpadded, tokens) == (result["input_ids_padded"], result["input_ids_unpadded"],
                                                  result["tokens"]), "CLIPTokenizer and CLIPTokenizerFast disagree"
    assert slow.model_max_length == 77 and slow.pad_token_id == 49407
    assert result["input_ids_padded"][0][:7] == [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat"
    # Other folder configurations, on the prompts where they can differ (special-token text) and a few more.
    subset = [p for p in PROMPTS if "<|" in p.lower() or "|>" in p][:20] + PROMPTS[:5]
    bare = CLIPTokenizer.from_pretrained(folders["bare"])
    bang = CLIPTokenizer.from_pretrained(folders["pad_bang"])
    result["variants"] = {
        "prompts": subset,
        "bare_folder_unpadded": bare(subset, truncation=True, max_length=77).input_ids,
        "pad_bang_padded": bang(subset, padding="max_length", max_length=77, truncation=True).input_ids,
        "pad_bang_pad_token_id": bang.pad_token_id,
    }
    (OUT / "tokenizer_reference.json").write_text(json.dumps(result, ensure_ascii=False, separators=(",", ":")))
    for name, folder in (("tokenizer_sd_v1", folders["sd_v1"]), ("tokenizer_pad_bang", folders["pad_bang"])):
        (OUT / name).mkdir(parents=True, exist_ok=True)
        for f in ("tokenizer_config.json", "special_tokens_map.json"):
            if (folder / f).exists():
                shutil.copy(folder / f, OUT / name / f)
    print(f"tokenizer: {len(PROMPTS)} prompts, {sum(len(r) > 77 for r in map(slow.tokenize, PROMPTS))} past 75 tokens")


# ---------------------------------------------------------------------------------------------------
# The tiny text encoder. vocab 1000 (the real 49,408 rows would not fit the fixture budget); the
# last two ids stand in for <|startoftext|> (998) and <|endoftext|> (999).
TINY = dict(vocab_size=1000, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=77, layer_norm_eps=1e-5, hidden_act="quick_gelu",
            pad_token_id=1, bos_token_id=0, eos_token_id=2)  # SD v1's legacy ids: pooling by argmax
TINY_BOS, TINY_EOS = 998, 999
TINY_OTHER_END = 997  # the eos_token_id of a "modern" config in the pooling test (first 997, not the max id)


def perturb_(model: torch.nn.Module, seed: int) -> None:
    """Move every parameter off its init so that no zero or one hides a mapping mistake."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def tiny_input_ids() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 990, (3, 77), generator=g)
    ids[:, 0] = TINY_BOS
    ids[0, 12:] = TINY_EOS            # a short prompt padded with the end token, as SD v1 pads
    ids[1, 76] = TINY_EOS             # a full-length prompt
    ids[2, 30] = TINY_OTHER_END       # 997 before 999: the two pooling rules pick different rows
    ids[2, 60] = TINY_EOS
    short = ids[:2, :9].clone()       # T = 9 < 77: only the first 9 positions are used
    short[:, 8] = TINY_EOS
    return ids, short


def text_encoder_fixtures(tmp: Path) -> None:
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(**TINY)).eval()
    perturb_(model, seed=2)
    ids, short = tiny_input_ids()
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        out_short = model(short)
        modern = CLIPTextModel(CLIPTextConfig(**{**TINY, "eos_token_id": TINY_OTHER_END})).eval()
        modern.load_state_dict(model.state_dict())
        pooled_modern = modern(ids).pooler_output
        gelu = CLIPTextModel(CLIPTextConfig(**{**TINY, "hidden_act": "gelu"})).eval()
        gelu.load_state_dict(model.state_dict())
        gelu_last = gelu(ids).last_hidden_state
    assert not torch.allclose(out.pooler_output[2], pooled_modern[2]), "pooling rules should differ on row 2"

    # SD v1 folder layout: text_model.* keys plus the position_ids buffer that transformers 4 saved.
    sd = {f"text_model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    sd["text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    (OUT / "text_encoder").mkdir(parents=True, exist_ok=True)
    save_file(sd, OUT / "text_encoder" / "model.safetensors")
    config = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "attention_dropout": 0.0,
              "dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02, "projection_dim": 32, **TINY}
    (OUT / "text_encoder" / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    reloaded = CLIPTextModel.from_pretrained(OUT / "text_encoder").eval()  # transformers reads this layout
    with torch.no_grad():
        assert torch.equal(reloaded(ids).last_hidden_state, out.last_hidden_state)

    # SD v1 single-file layout, with stand-ins for the UNet and VAE tensors that share the file.
    single = {f"cond_stage_model.transformer.{k}": v for k, v in sd.items()}
    single["model.diffusion_model.input_blocks.0.0.weight"] = torch.randn(4, 4, 3, 3)
    single["first_stage_model.decoder.conv_out.bias"] = torch.randn(3)
    save_file(single, OUT / "sd_v1_single_file.safetensors")
    converted = convert_ldm_clip_checkpoint(load_file(OUT / "sd_v1_single_file.safetensors"))  # diffusers' reading
    assert set(converted) == set(sd) and all(torch.equal(converted[k], sd[k]) for k in sd)

    # A full CLIPModel (text + tiny vision tower) whose text half is the same model.
    full_config = CLIPConfig(text_config=TINY, vision_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                             num_attention_heads=2, image_size=16, patch_size=8), projection_dim=8)
    full = CLIPModel(full_config).eval()
    perturb_(full, seed=3)
    full.text_model.load_state_dict(model.state_dict())
    full.save_pretrained(OUT / "clip_model")
    with torch.no_grad():
        assert torch.equal(CLIPModel.from_pretrained(OUT / "clip_model").text_model(ids).last_hidden_state,
                           out.last_hidden_state)

    save_file({
        "input_ids": ids, "last_hidden_state": out.last_hidden_state, "pooled_output": out.pooler_output,
        "hidden_states": torch.stack(out.hidden_states),          # (L + 1, B, T, D)
        "pooled_output_eos_997": pooled_modern,                   # the same weights with eos_token_id=997
        "gelu_last_hidden_state": gelu_last,                      # the same weights with hidden_act="gelu"
        "short_input_ids": short, "short_last_hidden_state": out_short.last_hidden_state,
        "short_pooled_output": out_short.pooler_output,
    }, OUT / "reference_outputs.safetensors", metadata={"reference": "transformers CLIPTextModel (sdpa)"})
    print(f"text encoder: hidden_states {len(out.hidden_states)} x {tuple(out.hidden_states[0].shape)}")


# ---------------------------------------------------------------------------------------------------
# Manifests of the real checkpoints, from the public configs, on the meta device.
CLIP_L14_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                     layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2, projection_dim=768)
CLIP_L14_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=224, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768)


def manifests() -> None:
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel
    with torch.device("meta"):
        text = CLIPTextModel(CLIPTextConfig(**CLIP_L14_TEXT))
        full = CLIPModel(CLIPConfig(text_config=CLIP_L14_TEXT, vision_config=CLIP_L14_VISION, projection_dim=768))
    text_sd = {f"text_model.{k}": list(v.shape) for k, v in text.state_dict().items()}
    position_ids = {"text_model.embeddings.position_ids": [1, 77]}  # int64; in files saved by transformers 4
    layouts = {
        "clip_sd_v1_text_encoder.json": ("text_encoder/model.safetensors of an SD v1 folder "
                                         "(CompVis/stable-diffusion-v1-4, runwayml/stable-diffusion-v1-5)",
                                         {**text_sd, **position_ids}),
        "clip_sd_v1_single_file.json": ("the text tower inside an original SD v1 single file (v1-5-pruned.safetensors); "
                                        "the file's UNet/VAE tensors are left out",
                                        {f"cond_stage_model.transformer.{k}": s for k, s in {**text_sd, **position_ids}.items()}),
        "clip_vit_l14_full.json": ("model.safetensors of openai/clip-vit-large-patch14 (CLIPModel: text + vision)",
                                   {k: list(v.shape) for k, v in full.state_dict().items()}),
    }
    MANIFESTS.mkdir(parents=True, exist_ok=True)
    for name, (what, tensors) in layouts.items():
        doc = {"checkpoint": what, "made_by": "tools/make_reference_clip.py: transformers CLIPTextModel/CLIPModel "
               "on the meta device from the public config", "text_config": CLIP_L14_TEXT,
               "optional": sorted(k for k in tensors if k.endswith("position_ids")),
               "tensors": dict(sorted(tensors.items()))}
        (MANIFESTS / name).write_text(json.dumps(doc, indent=1) + "\n")
        print(f"manifest {name}: {len(tensors)} tensors")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_fixtures(Path(tmp))
        text_encoder_fixtures(Path(tmp))
    manifests()
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"fixtures: {total / 1e6:.2f} MB under {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
