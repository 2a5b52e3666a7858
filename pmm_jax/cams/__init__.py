"""Class activation maps: the classifier methods (model, loss, optimiser), the CAM inference
methods (multi-scale, multi-crop) and PMM's multi-crop tiling."""
