"""Where corrections go: finding the sites of a model, tapping their outputs, folding into weights."""
