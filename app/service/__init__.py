"""The retrieval web service: FastAPI application, settings, micro-batching and the web page.

Build an application with :func:`app.service.main.create_app`.
"""
