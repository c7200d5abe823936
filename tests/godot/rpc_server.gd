# Godot 3.2.3's own WebSocketServer (gd_mp_api = true) playing the server's part of
# tests/godot/rpc_client.gd's run: the reference for tests/test_godot_rpc.py, which plays
# the same part in Python against wsfleet (server.multiplayer).
#
#   godot3-server --no-window -s rpc_server.gd --wsfleet-port=PORT --wsfleet-clients=N \
#       [--wsfleet-timeout=S]
#
# The node /root/Lobby (the server is its network master):
#   remote func echo(round, i, f, s, v, a, d)   answers rpc_id(sender, "server_reply",
#                                               round, i, f, s, v, a, d, sender)
#   remote func query()                         answers rpc_id(sender, "state", the score
#                                               that sender set, secret)
#   remote func client_ready()                  once N clients are ready: rset("hp", 77),
#                                               rset_id(peer, "tag", peer) for each,
#                                               Lobby/Board.rpc("board", N),
#                                               rpc("broadcast", N, "to everyone")
#   /root/Lobby/Chat: remote func say(n)        noted per sender (each client rpc()s it
#                                               to everyone, this server included)
#   remote var score (setget: noted per sender)  rset by clients: allowed
#   puppet var secret                           rset by clients: refused by the engine
#   func not_remote()                           not callable by clients (noted if called)
# Once every ready client has left it prints the summary ("exit") and exits 0; 2 on the
# deadline, 3 when listen failed, 4 for bad arguments. Observations: "RESULT {json}" lines.
extends SceneTree

const Common = preload("common.gd")


class Chat extends Node:
	var calls := []  # [sender, n] for every say

	remote func say(n):
		calls.append([get_tree().get_rpc_sender_id(), n])


class Lobby extends Node:
	var sink: Object
	remote var score := -1 setget set_score
	puppet var secret := -1
	puppet var hp := 0
	puppet var tag := 0

	func set_score(value) -> void:
		sink.on_score(get_tree().get_rpc_sender_id(), value)
		score = value

	remote func echo(round_no, i, f, s, v, a, d):
		sink.on_echo(get_tree().get_rpc_sender_id(), round_no, [i, f, s, v, a, d])

	func not_remote():
		sink.on_not_remote(get_tree().get_rpc_sender_id())

	remote func query():
		sink.on_query(get_tree().get_rpc_sender_id())

	remote func client_ready():
		sink.on_client_ready(get_tree().get_rpc_sender_id())


var server := WebSocketServer.new()
var lobby: Lobby
var chat: Chat
var expected_clients := 0
var deadline_ms := 0
var start_ms := 0
var finished_run := false
var echoes := []  # [sender, round, var2str(values)]
var scores := {}  # sender -> the score it set
var ready := []
var connected := {}
var left := []


func report(fields: Dictionary) -> void:
	fields["ms"] = OS.get_ticks_msec() - start_ms
	Common.result(fields)


func end_run(status: int) -> void:
	if finished_run:
		return
	finished_run = true
	report({
		"event": "exit", "status": status, "echoes": echoes, "scores": scores,
		"secret": lobby.secret if lobby else null, "ready": ready, "left": left,
		"chat": chat.calls if chat else [],
	})
	server.stop()
	quit(status)


func _init() -> void:
	# Headless Godot sleeps low_processor_usage_mode_sleep_usec (6900) every frame.
	OS.low_processor_usage_mode_sleep_usec = 1000
	start_ms = OS.get_ticks_msec()


func _initialize() -> void:
	var port := int(Common.option("port", "0"))
	expected_clients = int(Common.option("clients", "0"))
	deadline_ms = start_ms + int(float(Common.option("timeout", "30")) * 1000.0)
	if port <= 0 or expected_clients <= 0:
		report({"event": "bad_arguments", "args": OS.get_cmdline_args()})
		end_run(4)
		return
	lobby = Lobby.new()
	lobby.name = "Lobby"
	lobby.sink = self
	get_root().add_child(lobby)
	var board := Node.new()  # only a path here: the clients' Board has the remote func
	board.name = "Board"
	lobby.add_child(board)
	chat = Chat.new()
	chat.name = "Chat"
	lobby.add_child(chat)
	var err: int = server.listen(port, PoolStringArray(), true)
	if err != OK:
		report({"event": "listen_failed", "error": err, "port": port})
		end_run(3)
		return
	network_peer = server
	connect("network_peer_connected", self, "_on_peer_connected")
	connect("network_peer_disconnected", self, "_on_peer_disconnected")
	report({"event": "listening", "port": port})


func _idle(_delta: float) -> bool:
	if not finished_run and OS.get_ticks_msec() > deadline_ms:
		report({"event": "timeout", "connected": connected.keys(), "ready": ready})
		end_run(2)
	return false


func on_echo(sender: int, round_no: int, values: Array) -> void:
	echoes.append([sender, round_no, var2str(values)])
	var args := [sender, "server_reply", round_no] + values + [sender]
	lobby.callv("rpc_id", args)


func on_not_remote(sender: int) -> void:
	report({"event": "not_remote_called", "from": sender})


func on_score(sender: int, value) -> void:
	scores[str(sender)] = value


func on_query(sender: int) -> void:
	lobby.rpc_id(sender, "state", scores.get(str(sender), -1), lobby.secret)


func on_client_ready(sender: int) -> void:
	ready.append(sender)
	if ready.size() != expected_clients:
		return
	report({"event": "broadcast", "ready": ready})
	lobby.rset("hp", 77)
	for peer in ready:
		lobby.rset_id(peer, "tag", peer)
	lobby.get_node("Board").rpc("board", expected_clients)
	lobby.rpc("broadcast", expected_clients, "to everyone")


func _on_peer_connected(id: int) -> void:
	connected[id] = true
	report({"event": "peer_connected", "peer": id})


func _on_peer_disconnected(id: int) -> void:
	connected.erase(id)
	left.append(id)
	report({"event": "peer_disconnected", "peer": id})
	if ready.size() == expected_clients and connected.empty():
		end_run(0)
