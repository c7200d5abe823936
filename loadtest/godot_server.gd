# Godot 3.2.3's own WebSocketServer in plain mode (gd_mp_api = false), for the load scenarios:
# the server a Godot developer would run instead of wsfleet.
#
#   godot3-server --no-window -s loadtest/godot_server.gd --wsfleet-port=PORT \
#       [--wsfleet-mode=echo|broadcast] [--wsfleet-sleep-usec=0] [--wsfleet-bind=127.0.0.1] \
#       [--wsfleet-report-count=1]
#
# Options use the "--name=value" form with a "wsfleet-" prefix: Godot 3.2.3 keeps parsing its
# own options after "--". Run it in a temporary working directory (Godot writes logs/ there)
# with LANG=en_US.UTF-8.
#
# mode echo: every packet goes back to its sender, in the write mode it came in (text/binary).
# mode broadcast: every packet goes to every other connected peer, in the write mode it came in.
# The default buffers are kept (project settings network/limits/websocket_server/*: 64 KiB and
# 1024 packets each way per peer), as a game would have them.
#
# Once listening it prints "listening BIND:PORT"; a script that fails to parse makes Godot exit
# with status 0 and without that line, so whoever starts it must wait for the line. Godot 3.2.3
# dies on SIGTERM at once (no handler: no close frames, no _finalize). With
# --wsfleet-report-count=1 it prints "connected C received R deliveries D" (D: put_packet calls
# that returned OK) whenever those changed, at most every 200 ms: the last such line is the
# final count once the load has been quiet for longer than that. Exit status: 3 when listen
# failed, 4 for bad arguments.
extends SceneTree

var server := WebSocketServer.new()
var mode := "echo"
var peers := {}  # peer id -> true
var report_count := false
var connected := 0
var received := 0
var deliveries := 0
var failed_puts := 0
var finished := false
var reported := ""
var reported_ms := 0


func option(name: String, default: String) -> String:
	var prefix := "--wsfleet-" + name + "="
	for arg in OS.get_cmdline_args():
		if arg.begins_with(prefix):
			return arg.substr(prefix.length(), arg.length() - prefix.length())
	return default


func _init() -> void:
	# Headless Godot sleeps low_processor_usage_mode_sleep_usec (6900 by default) every frame;
	# 0 makes it a busy loop that answers at once (and burns its core even when idle).
	OS.low_processor_usage_mode_sleep_usec = int(option("sleep-usec", "0"))


func _initialize() -> void:
	var port := int(option("port", "0"))
	mode = option("mode", "echo")
	report_count = option("report-count", "0") == "1"
	var bind := option("bind", "127.0.0.1")
	if port <= 0 or not (mode in ["echo", "broadcast"]):
		print("bad arguments: ", OS.get_cmdline_args())
		finished = true
		quit(4)
		return
	server.bind_ip = bind
	server.connect("client_connected", self, "_on_connected")
	server.connect("client_disconnected", self, "_on_disconnected")
	server.connect("data_received", self, "_on_data")
	var err: int = server.listen(port, PoolStringArray(), false)
	if err != OK:
		print("listen on %s:%d failed: %d" % [bind, port, err])
		finished = true
		quit(3)
		return
	print("listening %s:%d" % [bind, port])


func _idle(_delta: float) -> bool:
	if finished:
		return false
	server.poll()
	if report_count and OS.get_ticks_msec() - reported_ms >= 200:
		reported_ms = OS.get_ticks_msec()
		var line := "connected %d received %d deliveries %d" % [connected, received, deliveries]
		if failed_puts > 0:
			line += " failed_puts %d" % failed_puts
		if line != reported:
			reported = line
			print(line)
	return false


func _on_connected(id: int, _protocol: String) -> void:
	peers[id] = true
	connected += 1


func _on_disconnected(id: int, _was_clean: bool) -> void:
	peers.erase(id)


func _on_data(id: int) -> void:
	var peer: WebSocketPeer = server.get_peer(id)
	while peer.get_available_packet_count() > 0:
		var packet := peer.get_packet()
		received += 1
		var write_mode := WebSocketPeer.WRITE_MODE_BINARY
		if peer.was_string_packet():
			write_mode = WebSocketPeer.WRITE_MODE_TEXT
		if mode == "echo":
			peer.set_write_mode(write_mode)
			_put(peer, packet)
		else:
			for other in peers:
				if other != id:
					var target: WebSocketPeer = server.get_peer(other)
					target.set_write_mode(write_mode)
					_put(target, packet)


func _put(target: WebSocketPeer, packet: PoolByteArray) -> void:
	if target.put_packet(packet) == OK:
		deliveries += 1
	else:
		failed_puts += 1
