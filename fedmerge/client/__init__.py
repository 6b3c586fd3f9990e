"""The hospital side: the Flower ClientApp and the node that builds, sends and installs (its daemon is in fedmerge.federation)."""
