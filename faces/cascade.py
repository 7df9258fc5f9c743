"""Reading an OpenCV Haar cascade (`haarcascade_*.xml`, the "new" cascade format) with xml.etree.

A cascade (Viola & Jones 2001, "Rapid Object Detection using a Boosted Cascade of Simple
Features"; Lienhart & Maydt 2002 for the extended/tilted feature set) is a list of stages. Each
stage is a boosted sum of weak classifiers; a window is rejected as soon as one stage's sum falls
below that stage's threshold. In the file:

    <cascade>
      <stageType>BOOST</stageType> <featureType>HAAR</featureType>
      <width>24</width> <height>24</height>               the detection window
      <stages><_>                                          one stage
          <stageThreshold>-5.04</stageThreshold>
          <weakClassifiers><_>                             one weak classifier (a decision tree)
              <internalNodes> left right featureIdx threshold  (x number of nodes) </internalNodes>
              <leafValues> v0 v1 ... </leafValues>
      <features><_>                                        one Haar feature
          <rects><_> x y w h weight </_> ... </rects>      2 or 3 weighted rectangles
          <tilted>0</tilted>                               1: rectangles rotated by 45 degrees

In `internalNodes` a child index > 0 names the next node of the same tree, an index <= 0 names the
leaf -index. The frontal-face cascade uses stumps only ("0 -1 f t": left leaf 0, right leaf 1).

OpenCV stores every threshold and leaf as float32 and lowers each stage threshold by 1e-5
(`THRESHOLD_EPS` in objdetect/src/cascadedetect.cpp) so a window exactly at a trained threshold
still passes; we keep both details, because the detector must take the same decisions.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

STAGE_THRESHOLD_EPS = np.float32(1e-5)   # OpenCV's THRESHOLD_EPS, subtracted in float32
MAX_RECTS = 3                            # a Haar feature has 2 or 3 rectangles
DEFAULT_CASCADE = Path(__file__).with_name("haarcascade_frontalface_default.xml")


class CascadeError(ValueError):
    """A cascade file that cannot be read or is not a Haar cascade. The message names the file."""


@dataclass(frozen=True)
class HaarFeature:
    rects: tuple[tuple[int, int, int, int], ...]   # (x, y, w, h) inside the window
    weights: tuple[float, ...]                     # one float32 weight per rectangle
    tilted: bool                                   # rectangles rotated by 45 degrees


@dataclass(frozen=True)
class WeakTree:
    """A decision tree over features: node i tests feature[i] < threshold[i] and goes left/right."""
    left: tuple[int, ...]         # > 0: next node index; <= 0: leaf -left
    right: tuple[int, ...]
    feature: tuple[int, ...]
    threshold: tuple[float, ...]  # float32 values
    leaves: tuple[float, ...]     # float32 values


@dataclass(frozen=True)
class Stage:
    threshold: float              # float32, already lowered by STAGE_THRESHOLD_EPS
    trees: tuple[WeakTree, ...]


@dataclass(frozen=True)
class HaarCascade:
    window: tuple[int, int]       # (width, height) of the detection window, 24x24 for faces
    stages: tuple[Stage, ...]
    features: tuple[HaarFeature, ...]
    source: str                   # the file it was read from, for messages

    @property
    def is_stump_cascade(self) -> bool:
        return all(len(t.feature) == 1 for s in self.stages for t in s.trees)

    @property
    def has_tilted_features(self) -> bool:
        return any(f.tilted for f in self.features)


def _child(node: ET.Element, tag: str, where: str) -> ET.Element:
    found = node.find(tag)
    if found is None:
        raise CascadeError(f"{where}: missing <{tag}>")
    return found


def _numbers(node: ET.Element, tag: str, where: str) -> list[str]:
    return (_child(node, tag, where).text or "").split()


def _int(text: str, where: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise CascadeError(f"{where}: expected an integer, got {text!r}") from None


def _f32(text: str, where: str) -> float:
    try:
        return float(np.float32(float(text)))
    except ValueError:
        raise CascadeError(f"{where}: expected a number, got {text!r}") from None


def _read_tree(node: ET.Element, where: str) -> WeakTree:
    internal = _numbers(node, "internalNodes", where)
    leaves = [_f32(v, where) for v in _numbers(node, "leafValues", where)]
    if not internal or len(internal) % 4:
        raise CascadeError(f"{where}: <internalNodes> must hold groups of 4 numbers "
                           f"(left right featureIdx threshold), got {len(internal)}")
    nodes = [internal[i:i + 4] for i in range(0, len(internal), 4)]
    if len(leaves) != len(nodes) + 1:
        raise CascadeError(f"{where}: a tree with {len(nodes)} nodes needs {len(nodes) + 1} leaves, "
                           f"got {len(leaves)}")
    left = tuple(_int(n[0], where) for n in nodes)
    right = tuple(_int(n[1], where) for n in nodes)
    for child in left + right:
        if child >= len(nodes) or -child >= len(leaves):
            raise CascadeError(f"{where}: child index {child} outside the tree")
    return WeakTree(left=left, right=right, feature=tuple(_int(n[2], where) for n in nodes),
                    threshold=tuple(_f32(n[3], where) for n in nodes), leaves=tuple(leaves))


def _read_feature(node: ET.Element, window: tuple[int, int], where: str) -> HaarFeature:
    rect_nodes = list(_child(node, "rects", where))
    if not 1 <= len(rect_nodes) <= MAX_RECTS:
        raise CascadeError(f"{where}: a Haar feature has 1 to {MAX_RECTS} rectangles, got {len(rect_nodes)}")
    rects, weights = [], []
    for rect_node in rect_nodes:
        values = (rect_node.text or "").split()
        if len(values) != 5:
            raise CascadeError(f"{where}: a rectangle is 'x y w h weight', got {rect_node.text!r}")
        x, y, w, h = (_int(v.rstrip("."), where) for v in values[:4])
        rects.append((x, y, w, h))
        weights.append(_f32(values[4], where))
    tilted_node = node.find("tilted")
    tilted = tilted_node is not None and _int((tilted_node.text or "0").strip(), where) != 0
    width, height = window
    for x, y, w, h in rects:
        inside = (0 <= x - h and x + w <= width and y + w + h <= height) if tilted else \
                 (0 <= x and 0 <= y and x + w <= width and y + h <= height)
        if not inside or w < 0 or h < 0:
            raise CascadeError(f"{where}: rectangle {(x, y, w, h)} lies outside the {width}x{height} window")
    return HaarFeature(rects=tuple(rects), weights=tuple(weights), tilted=tilted)


def load_cascade(path: str | Path = DEFAULT_CASCADE) -> HaarCascade:
    """Parse an OpenCV HAAR cascade file. Raises CascadeError naming the file on any problem."""
    path = Path(path)
    if not path.is_file():
        raise CascadeError(f"{path}: no such cascade file")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        truncated = "no element found" in str(err) or "unclosed token" in str(err)
        raise CascadeError(f"{path}: not a well-formed XML file ({err})"
                           + ("; it looks truncated (an interrupted download?)" if truncated else "")) from None
    cascade = root.find("cascade") if root.tag == "opencv_storage" else None
    if cascade is None:
        old = root[0].get("type_id") if len(root) else None
        hint = " (the pre-2.4 'opencv-haar-classifier' format is not supported)" if old == "opencv-haar-classifier" else ""
        raise CascadeError(f"{path}: not an OpenCV cascade: expected <opencv_storage><cascade>{hint}")
    where = str(path)
    stage_type = (_child(cascade, "stageType", where).text or "").strip()
    feature_type = (_child(cascade, "featureType", where).text or "").strip()
    if stage_type != "BOOST" or feature_type != "HAAR":
        raise CascadeError(f"{path}: only BOOST stages over HAAR features are supported, "
                           f"got stageType={stage_type!r} featureType={feature_type!r}")
    window = (_int(_child(cascade, "width", where).text or "", where),
              _int(_child(cascade, "height", where).text or "", where))
    if min(window) < 3:
        raise CascadeError(f"{path}: window {window} too small")

    stages = []
    for si, stage_node in enumerate(_child(cascade, "stages", where)):
        here = f"{path}: stage {si}"
        threshold = np.float32(_f32(_child(stage_node, "stageThreshold", here).text or "", here))
        trees = tuple(_read_tree(tree, f"{here} weak classifier {ti}")
                      for ti, tree in enumerate(_child(stage_node, "weakClassifiers", here)))
        if not trees:
            raise CascadeError(f"{here}: no weak classifiers")
        stages.append(Stage(threshold=float(threshold - STAGE_THRESHOLD_EPS), trees=trees))
    features = tuple(_read_feature(node, window, f"{path}: feature {fi}")
                     for fi, node in enumerate(_child(cascade, "features", where)))
    if not stages or not features:
        raise CascadeError(f"{path}: a cascade needs at least one stage and one feature")

    stage_num = cascade.find("stageNum")
    if stage_num is not None and _int((stage_num.text or "").strip(), where) != len(stages):
        raise CascadeError(f"{path}: <stageNum> says {stage_num.text.strip()} stages, found {len(stages)}")
    for si, stage in enumerate(stages):
        for tree in stage.trees:
            if max(tree.feature) >= len(features) or min(tree.feature) < 0:
                raise CascadeError(f"{path}: stage {si} uses feature {max(tree.feature)}, "
                                   f"but the file has {len(features)} features")
    return HaarCascade(window=window, stages=tuple(stages), features=features, source=str(path))
