"""Feature-space analysis: per-stage embeddings of encoders (features), linear CKA between
them (cka), what a frozen encoder already knows (probes, kNN and linear), 2-D domain maps
(maps) and their figures; `xd-analyze` is a thin CLI over it."""
