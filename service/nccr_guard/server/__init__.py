"""The HTTP layer: thin routers over the model runtimes (detector + batcher); `create_app(settings)` builds it."""
