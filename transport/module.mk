# TEMPORARY (rdma worktree only): the transport owner's module.mk replaces this;
# it must contain the line below.
-include transport/rdma.mk
