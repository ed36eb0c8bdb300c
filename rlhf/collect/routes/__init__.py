"""The collection app's routers (sign-in, HTML pages, JSON API) and the state and error handlers they share."""
