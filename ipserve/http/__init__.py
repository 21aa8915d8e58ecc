"""The HTTP/1.1 and WebSocket engine a worker runs: gevent sockets, the
httptools (llhttp) parser, and a WSGI gateway.

A request's path, in the order the code runs:

  server.Server        accepts (at most worker_connections), one greenlet each
  connection.Connection  reads bytes, feeds them to the parser, builds the
                       environ, calls the application, writes the response
  parser.RequestParser llhttp callbacks -> parser.Request (line, headers, body),
                       with our limits checked as the bytes arrive
  body.Input           wsgi.input: pulls body bytes through the connection
  response             the response head, chunked framing, Date cache
  websocket            RFC 6455 handshake and frames, gevent-websocket's API

Every read the server makes on a client's behalf has a deadline; one sweeper
greenlet per server ends connections whose deadline passed (see
Connection.deadline), instead of a timer per read.
"""
