"""The hospital side: the Flower ClientApp and the client daemon."""
