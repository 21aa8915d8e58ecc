"""The master: supervises workers and routes slots; never serves traffic."""
