"""The method: settings, references and memory bank, matching, upsampling, merging, the Segmenter, results."""
