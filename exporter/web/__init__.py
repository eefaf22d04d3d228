"""HTTP: the endpoints, their TLS and basic auth, and the overview page."""
