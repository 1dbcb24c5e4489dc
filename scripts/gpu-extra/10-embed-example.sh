# The embedding example on the host program's own stream.
"$HERE/bin/embed_ops" && echo "RESULT embed_ops example ok"
