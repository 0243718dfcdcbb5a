"""flows: Prefect flows that compose tasks; they hold no computation of their own."""
