"""l2r: learn to rank pixel importance. The notebook API is `l2r.api`, re-exported here."""

from l2r.api import TrainedExplainer, attribute, load, load_target, preprocess, score

__all__ = ["TrainedExplainer", "attribute", "load", "load_target", "preprocess", "score"]
