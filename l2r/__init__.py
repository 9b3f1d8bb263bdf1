"""l2r: learn to rank pixel importance. The notebook API is `l2r.api`, re-exported here."""

from l2r.api import Report, TrainedExplainer, attribute, load, load_target, preprocess, report, score

__all__ = ["Report", "TrainedExplainer", "attribute", "load", "load_target", "preprocess", "report", "score"]
