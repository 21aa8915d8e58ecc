"""A worker process: one gevent hub serving one slot on its own port."""
