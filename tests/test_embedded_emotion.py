"""The embedded emotion ViT (embedded/emotion_vit): loads strictly, stays small, and is the default of
predict_emotion.py and serve_emotion.py, which then read synthetic faces of every class correctly."""
import json

import predict_emotion
import serve_emotion
from embedded import EMOTION_VIT
from vit.classifier import ImageClassifier
from vit.synthetic_faces import EMOTION_LABELS, make_face

MAX_BYTES = 10 * 2**20


def test_shipped_files_are_small_and_dima806_labelled():
    assert sum(f.stat().st_size for f in EMOTION_VIT.iterdir()) <= MAX_BYTES
    config = json.loads((EMOTION_VIT / "config.json").read_text())
    assert [config["id2label"][str(i)] for i in range(7)] == list(EMOTION_LABELS)
    ImageClassifier(EMOTION_VIT)   # strict: every tensor mapped, none left over


def test_predict_without_model_flag_uses_it(tmp_path, capsys):
    for label in EMOTION_LABELS:   # seeds far from the training (0...) and evaluation seeds
        make_face(label, 987_654).save(tmp_path / f"{label}.png")
    assert predict_emotion.main(["--top_k", "1", str(tmp_path)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == len(EMOTION_LABELS)
    for line in lines:
        name = line["image"].rsplit("/", 1)[-1].removesuffix(".png")
        assert line["predictions"][0]["label"] == name


def test_serve_defaults_to_it():
    assert serve_emotion.parse_args([]).model == str(EMOTION_VIT)
