//! `corral csi`: the CSI plugin (spec v1.12) — Identity, Controller and Node
//! services over the node daemons, served on a unix socket.
