"""Input and output: images, COCO files, pictures of results, atomic file writing."""
