"""Models the project ships its demo and explainers with, importable from an installed wheel
(specs `l2r.zoo.MODULE:callable`)."""
