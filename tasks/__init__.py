"""tasks: Prefect tasks (one stage step each), Ray resources, the artifact store and UI reports."""
