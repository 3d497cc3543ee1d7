"""The HTTP layer: the app and its middlewares, the /v1 and admin handlers, bodies, routes, answers."""
