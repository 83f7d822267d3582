"""The method-agnostic training and inference engine: builds what a method declares, runs the loop."""
