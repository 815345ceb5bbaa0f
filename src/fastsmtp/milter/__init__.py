"""The milter protocol (libmilter's, version 6), as an MTA speaks it: the codec and one conversation.

``protocol`` turns commands into octets and octets into replies, without
I/O; ``client`` holds one conversation with one milter over a stream.
"""
