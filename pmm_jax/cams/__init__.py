"""Class activation maps: the SEAM classifier losses, multi-crop tiling and multi-crop CAM inference."""
