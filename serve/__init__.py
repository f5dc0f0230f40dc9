"""Using the exported model: `serve.predict` (image files to CSV or JSON) and `serve.http` (an HTTP server).

Both need only `models/export/` (or an MLflow model) and `serve.preprocess`, which prepare also
uses, so that an image gets the same pixels in training and in use.
"""
