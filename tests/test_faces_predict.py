"""predict_emotion.py --faces / --box / --fallback_whole_image / --draw and serve_emotion.py's
{"faces": true}, with the tiny ViT fixture.

The per-face scores must equal classifying the crops directly (the crop is the detector's box
grown by --face_margin), and every bad input is named while the other images are still processed.
"""
import base64
import http.client
import io
import json
import shutil
import threading
from pathlib import Path

import pytest
from PIL import Image

import predict_emotion
from faces import detect_faces
from faces.crops import crop_box
from serve_emotion import EmotionServer
from vit.classifier import ImageClassifier
from common.images import load_image

FIX = Path(__file__).parent / "fixtures"
MODEL = str(FIX / "vit/hf_classifier")
FOUR_FACES = str(FIX / "faces/pasted_faces_640x480.jpg")
NO_FACE = str(FIX / "faces/coffee.jpg")


@pytest.fixture(scope="module")
def classifier():
    return ImageClassifier(MODEL)


def run(capsys, *argv):
    code = predict_emotion.main(["--model", MODEL, *argv])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()], err


def _close(ours, expected):
    assert [p["label"] for p in ours] == [p["label"] for p in expected]
    assert max(abs(p["score"] - e["score"]) for p, e in zip(ours, expected)) <= 1e-5


def test_each_face_cropped_with_margin_and_classified(capsys, classifier):
    code, lines, _ = run(capsys, "--faces", "--face_margin", "0.25", "--top_k", "3", "--batch_size", "3", FOUR_FACES)
    assert code == 0 and len(lines) == 1 and lines[0]["image"] == FOUR_FACES
    image = load_image(FOUR_FACES)
    boxes = detect_faces(image)
    assert [f["box"] for f in lines[0]["faces"]] == [list(b) for b in boxes] and len(boxes) == 4
    bx, by, bw, bh = boxes[0]
    dx, dy = round(0.25 * bw), round(0.25 * bh)      # the margin, on every side
    assert crop_box(boxes[0], 0.25, image.size) == (bx - dx, by - dy, bw + 2 * dx, bh + 2 * dy)
    assert crop_box((0, 0, 40, 40), 0.5, (50, 50)) == (0, 0, 50, 50)     # clipped to the image
    crops = [image.crop((x, y, x + w, y + h)) for x, y, w, h in (crop_box(b, 0.25, image.size) for b in boxes)]
    for face, expected in zip(lines[0]["faces"], classifier.predict(crops, top_k=3)):
        _close(face["predictions"], expected)


def test_no_face_says_so_and_fallback_classifies_whole(capsys, classifier):
    code, lines, _ = run(capsys, "--faces", NO_FACE)
    assert code == 0 and lines == [{"image": NO_FACE, "faces": []}]
    code, lines, _ = run(capsys, "--faces", "--fallback_whole_image", "--top_k", "7", NO_FACE, FOUR_FACES)
    assert code == 0 and lines[0]["faces"] == [] and "predictions" not in lines[1]
    _close(lines[0]["predictions"], classifier.predict([load_image(NO_FACE)], top_k=7)[0])


def test_box_classifies_given_regions(capsys, classifier):
    code, lines, _ = run(capsys, "--box", "10,20,64,48", "--box", "0,0,30,30", "--top_k", "2", FOUR_FACES)
    assert code == 0 and [f["box"] for f in lines[0]["faces"]] == [[10, 20, 64, 48], [0, 0, 30, 30]]
    image = load_image(FOUR_FACES)
    expected = classifier.predict([image.crop((10, 20, 74, 68)), image.crop((0, 0, 30, 30))], top_k=2)
    for face, exp in zip(lines[0]["faces"], expected):
        _close(face["predictions"], exp)


def test_box_outside_and_tiny_image_named_others_processed(tmp_path, capsys):
    small = tmp_path / "small.png"
    Image.new("RGB", (40, 30), (90, 120, 150)).save(small)
    code, lines, _ = run(capsys, "--box", "10,10,32,24", str(small), FOUR_FACES)
    assert code == 1
    assert lines[0] == {"image": str(small), "error": f"{small}: box 10,10,32,24 lies outside the 40x30 image"}
    assert len(lines[1]["faces"]) == 1

    dot = tmp_path / "dot.png"
    Image.new("RGB", (1, 1)).save(dot)
    code, lines, _ = run(capsys, "--faces", str(dot), FOUR_FACES)
    assert code == 1 and str(dot) in lines[0]["error"] and "1x1" in lines[0]["error"]
    assert len(lines[1]["faces"]) == 4


def test_draw_writes_each_image_with_boxes(tmp_path, capsys):
    shutil.copy(FOUR_FACES, tmp_path / "a.jpg")
    (tmp_path / "b.jpg").write_bytes(b"not an image")
    out = tmp_path / "drawn"
    code, lines, _ = run(capsys, "--faces", "--draw", str(out), str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg"))
    assert code == 1 and "error" in lines[1]
    assert sorted(p.name for p in out.iterdir()) == ["a.png"]
    drawn, original = Image.open(out / "a.png").convert("RGB"), load_image(tmp_path / "a.jpg")
    assert drawn.size == original.size
    x, y, w, h = lines[0]["faces"][0]["box"]
    assert drawn.getpixel((x, y + h // 2)) == (255, 40, 40) != original.getpixel((x, y + h // 2))


@pytest.mark.parametrize("flags, message", [
    (["--faces", "--box", "1,2,3,4"], "--faces and --box: choose one"),
    (["--box", "1,2,3"], "--box '1,2,3': expected x,y,w,h"),
    (["--box", "1,2,0,4"], "w, h >= 1"),
    (["--fallback_whole_image"], "--fallback_whole_image only applies with --faces"),
    (["--faces", "--face_margin", "-0.1"], "--face_margin -0.1: must be >= 0"),
    (["--draw", "out"], "--draw needs --faces or --box"),
])
def test_bad_flags_named(flags, message, capsys):
    with pytest.raises(SystemExit):
        predict_emotion.main(["--model", MODEL, *flags, FOUR_FACES])
    assert message in capsys.readouterr().err


# ---- serve_emotion.py {"parameters": {"faces": true}} --------------------------------------------

@pytest.fixture(scope="module")
def server(classifier):
    srv = EmotionServer(classifier, port=0, max_batch_size=8, max_wait_ms=20, quiet=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.close()
    thread.join()


def post(srv, image: bytes, **parameters):
    body = json.dumps({"inputs": base64.b64encode(image).decode(), "parameters": parameters})
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=60)
    conn.request("POST", "/", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    status, payload = response.status, json.loads(response.read())
    conn.close()
    return status, payload


def test_server_faces_equal_predict_emotion(server, capsys):
    _, lines, _ = run(capsys, "--faces", "--top_k", "3", FOUR_FACES)
    status, faces = post(server, Path(FOUR_FACES).read_bytes(), faces=True, top_k=3)
    assert status == 200 and [f["box"] for f in faces] == [f["box"] for f in lines[0]["faces"]]
    for face, expected in zip(faces, lines[0]["faces"]):
        _close(face["predictions"], expected["predictions"])
    status, faces = post(server, Path(NO_FACE).read_bytes(), faces=True)
    assert (status, faces) == (200, [])
    status, plain = post(server, Path(NO_FACE).read_bytes(), faces=False, top_k=2)
    assert status == 200 and [p["label"] for p in plain] == [p["label"] for p in run(capsys, "--top_k", "2", NO_FACE)[1][0]["predictions"]]


def test_server_faces_bad_input(server, tmp_path):
    dot = tmp_path / "dot.png"
    Image.new("RGB", (1, 1)).save(dot)
    status, answer = post(server, dot.read_bytes(), faces=True)
    assert status == 400 and "request body" in answer["error"] and "1x1" in answer["error"]
    status, answer = post(server, Path(FOUR_FACES).read_bytes(), faces="yes")
    assert status == 400 and "parameters.faces" in answer["error"]
    assert post(server, Path(NO_FACE).read_bytes(), faces=True)[0] == 200     # still serving


def test_server_detects_on_a_shrunk_copy_and_answers_in_the_image_pixels(classifier):
    """--max_detect_side: an image of 2x2 blocks, shrunk to half, is the original exactly, so the boxes are
    the original's (found with the shrunk min_size) doubled, and the crops are cut from the big image."""
    image = load_image(FOUR_FACES)
    double = image.resize((2 * image.width, 2 * image.height), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    double.save(buffer, "PNG")
    srv = EmotionServer(classifier, port=0, max_batch_size=8, max_wait_ms=20, max_detect_side=640, quiet=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        status, faces = post(srv, buffer.getvalue(), faces=True, top_k=7)
    finally:
        srv.shutdown()
        srv.close()
        thread.join()
    expected = [[2 * v for v in box] for box in detect_faces(image, min_size=(15, 15))]   # 30x30 in the big one
    assert status == 200 and len(expected) == 4 and [f["box"] for f in faces] == expected
    assert all(len(f["predictions"]) == 7 for f in faces)
