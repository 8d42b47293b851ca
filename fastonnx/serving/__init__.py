"""Serving an encoder: the HTTP request handling (no server framework), the Ray Serve
deployment around it, a Triton model repository writer, and a loopback load test.

Only ``ray_app`` needs Ray; the other modules use the standard library (and fastonnx).
"""
