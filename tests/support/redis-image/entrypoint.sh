#!/bin/sh
# like the official image: no protected mode (the container's network is the boundary)
[ "$1" = redis-server ] && { shift; exec redis-server "$@" --protected-mode no; }
exec "$@"
