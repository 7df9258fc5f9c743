"""A tiny procedural world of captioned shapes (see world/world.py), and a checker that reads a
scene's colour and shape back from pixels (world/checker.py)."""
from world.scene import COLOURS, HELD_OUT, POSITIONS, SHAPES, SIZES, Scene, draw
from world.world import Batch, World, combinations

__all__ = ["COLOURS", "HELD_OUT", "POSITIONS", "SHAPES", "SIZES", "Scene", "draw", "Batch", "World", "combinations"]
