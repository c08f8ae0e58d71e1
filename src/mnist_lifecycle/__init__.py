"""Code shared by the notebooks, the pipeline and the model server."""
