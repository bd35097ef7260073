#!/bin/sh
# Frames the content of a file.
echo "*** $(cat "$1") ***"
