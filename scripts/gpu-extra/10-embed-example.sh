# The embedding examples on a host program's own stream: moco's ops (embed_ops) and a
# plain-cudarc encoder trained with MocoHead (cudarc_encoder).
"$HERE/bin/embed_ops" && echo "RESULT embed_ops example ok"
"$HERE/bin/cudarc_encoder" && echo "RESULT cudarc_encoder example ok"
