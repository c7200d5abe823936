# What the scripts in tests/godot share; each loads it as
#
#   const Common = preload("common.gd")
#
# and calls its static functions: the "--wsfleet-NAME=VALUE" options, the "RESULT {json}"
# lines, hex dumps, and (mp_client.gd and mp_server.gd) the nodes /root/Harness and
# /root/Harness/Inner with the remote functions of the multiplayer run.
#
# preload finds common.gd next to the script that loads it when Godot gets the script as
# an absolute path (as the tests and the benchmark give it) or as a path below its working
# directory; a path through ".." leaves res:// and the preload fails.
extends Reference


class Harness extends Node:
	# Every call mp_client.gd's run makes goes to sink.on_rpc(call, args, node).
	var sink: Object

	remote func hello(from_id):
		sink.on_rpc("hello", [from_id], self)

	remote func hello_ack(from_id):
		sink.on_rpc("hello_ack", [from_id], self)

	remote func direct(from_id, seq):
		sink.on_rpc("direct", [from_id, seq], self)

	remote func tick(from_id):
		sink.on_rpc("tick", [from_id], self)

	remote func all_but(from_id):
		sink.on_rpc("all_but", [from_id], self)

	remote func finished(from_id):
		sink.on_rpc("finished", [from_id], self)

	remote func finished_all(from_id):
		sink.on_rpc("finished_all", [from_id], self)

	remote func bye(from_id):
		sink.on_rpc("bye", [from_id], self)


# [/root/Harness, /root/Harness/Inner], both reporting to sink.on_rpc.
static func add_harness(tree: SceneTree, sink: Object) -> Array:
	var harness := Harness.new()
	harness.name = "Harness"
	harness.sink = sink
	tree.get_root().add_child(harness)
	var inner := Harness.new()
	inner.name = "Inner"
	inner.sink = sink
	harness.add_child(inner)
	return [harness, inner]


# The value of --wsfleet-NAME=VALUE on the command line, or default.
static func option(name: String, default: String) -> String:
	var prefix := "--wsfleet-" + name + "="
	for arg in OS.get_cmdline_args():
		if arg.begins_with(prefix):
			return arg.substr(prefix.length(), arg.length() - prefix.length())
	return default


# One observation: the line "RESULT {json}" on stdout.
static func result(fields: Dictionary) -> void:
	print("RESULT ", JSON.print(fields))


static func hex(data: PoolByteArray) -> String:
	var out := ""
	for byte in data:
		out += "%02x" % byte
	return out
