# A real Godot 3.2.3 client calling a server's node by RPC and rset, for
# tests/test_godot_rpc.py. The server is either wsfleet (server.multiplayer, with a
# Python object at /root/Lobby) or Godot's own WebSocketServer (tests/godot/rpc_server.gd).
#
#   godot3-server --no-window -s rpc_client.gd --wsfleet-url=ws://127.0.0.1:PORT/ \
#       [--wsfleet-timeout=S]
#
# The client has a node at /root/Lobby with the server's remote functions and puppet vars.
# Its run (every step waits for the answer to the one before; the server answers each):
#   1. connected_to_server: Lobby.rpc_id(1, "echo", 1, <int, float, String, Vector2,
#      Array, Dictionary>): the first call on the path (SIMPLIFY_PATH + the full path).
#   2. server_reply(1, the same six values, the sender the server saw): checked against what
#      was sent (var2str), then Lobby.rpc_id(1, "echo", 2, <six other values>) (by path id).
#   3. server_reply(2, ...): Lobby.rset_id(1, "score", me) (a remote var on the server:
#      allowed), Lobby.rset_id(1, "secret", me) (a puppet var there, and the server is the
#      master: refused), three calls the server refuses (echo with one argument,
#      not_remote: a method not marked remote, no_such_method), Lobby.rpc_id(1, "query").
#   4. state(score, secret): what the server holds (score = me, secret untouched), then
#      Lobby.rpc_id(1, "client_ready").
#   5. The server, once every client is ready: rset("hp", 77), rset_id(me, "tag", me),
#      Lobby/Board.rpc("board", clients) (a path the server never used: SIMPLIFY_PATH and
#      the full path to each client), rpc("broadcast", clients, "to everyone"). On
#      broadcast: hp, tag and the board calls so far are reported.
#   6. Once network_peer_connected fired for every client the broadcast counts:
#      Lobby/Chat.rpc("say", me), to everyone: the other clients through the relay, the
#      server's node too (each gets SIMPLIFY_PATH and a full-path call from this client).
#      Once every other client's "say" came in, the client waits a little for any
#      duplicate, then closes (1000, "done").
# Every call received reports its sender (get_rpc_sender_id(), 1 for the server).
#
# Every observation goes to stdout as one line "RESULT {json}". The exit status is 0 when
# the run reached its end, 2 on the script's own deadline, 3 when the connection failed or
# ended before the script closed it, 4 for bad arguments.
extends SceneTree

const Common = preload("common.gd")
const LINGER_MS = 300  # after broadcast: time for a duplicate to show up


class Lobby extends Node:
	var sink: Object
	puppet var hp := 0
	puppet var tag := 0

	remote func server_reply(round_no, i, f, s, v, a, d, seen):
		sink.on_reply(get_tree().get_rpc_sender_id(), round_no, [i, f, s, v, a, d], seen)

	remote func state(score, secret):
		sink.on_state(get_tree().get_rpc_sender_id(), score, secret)

	remote func broadcast(n, text):
		sink.on_broadcast(get_tree().get_rpc_sender_id(), n, text)


class Chat extends Node:
	var calls := []  # [sender, n] for every say

	remote func say(n):
		calls.append([get_tree().get_rpc_sender_id(), n])


class Board extends Node:
	var calls := []  # [sender, n] for every board call

	remote func board(n):
		calls.append([get_tree().get_rpc_sender_id(), n])


var client := WebSocketClient.new()
var lobby: Lobby
var board: Board
var chat: Chat
var clients := 0  # how many the broadcast counts
var known := {}  # peer id -> true, from network_peer_connected
var phase := "connecting"
var finished_run := false
var deadline_ms := 0
var start_ms := 0
var linger_until := 0
var me := 0
var broadcasts := 0
var replies := 0
var failures := []


# The arguments of echo round 1 and 2: every type the issue names, nested ones too.
func echo_args(round_no: int) -> Array:
	if round_no == 1:
		return [
			7, 0.1, "héllo ✓", Vector2(1.5, -2.25), [1, "two", [3.5, true]],
			{"k": "v", "n": [1, 2], 3: Vector2(0, 1)},
		]
	return [-123456789012, 2.5, "", Vector2(-0.5, 8), [], {}]


func report(fields: Dictionary) -> void:
	fields["ms"] = OS.get_ticks_msec() - start_ms
	Common.result(fields)


func fail(what: String) -> void:
	failures.append(what)
	report({"event": "failure", "what": what})


func end_run(status: int) -> void:
	if finished_run:
		return
	finished_run = true
	report({
		"event": "exit", "status": status, "phase": phase, "id": me, "failures": failures,
		"broadcasts": broadcasts, "replies": replies, "board": board.calls if board else [],
		"chat": chat.calls if chat else [],
	})
	quit(status)


func _init() -> void:
	# Headless Godot sleeps low_processor_usage_mode_sleep_usec (6900) every frame.
	OS.low_processor_usage_mode_sleep_usec = 1000
	start_ms = OS.get_ticks_msec()


func _initialize() -> void:
	var url := Common.option("url", "")
	deadline_ms = start_ms + int(float(Common.option("timeout", "20")) * 1000.0)
	if url == "":
		report({"event": "bad_arguments", "args": OS.get_cmdline_args()})
		end_run(4)
		return
	lobby = Lobby.new()
	lobby.name = "Lobby"
	lobby.sink = self
	get_root().add_child(lobby)
	board = Board.new()
	board.name = "Board"
	lobby.add_child(board)
	chat = Chat.new()
	chat.name = "Chat"
	lobby.add_child(chat)
	connect("network_peer_connected", self, "_on_peer_connected")
	connect("connected_to_server", self, "_on_connected_to_server")
	connect("connection_failed", self, "_on_connection_failed")
	connect("server_disconnected", self, "_on_server_disconnected")
	client.connect("connection_closed", self, "_on_connection_closed")
	var err: int = client.connect_to_url(url, PoolStringArray(), true)
	report({"event": "connect_to_url", "error": err, "url": url})
	if err != OK:
		end_run(3)
		return
	network_peer = client


func _idle(_delta: float) -> bool:
	if finished_run:
		return false
	if OS.get_ticks_msec() > deadline_ms:
		report({"event": "timeout", "phase": phase})
		end_run(2)
		return false
	if phase == "chat_wait" and known.size() >= clients:  # the server and the others
		phase = "chatting"
		report({"event": "say", "known": known.keys()})
		chat.rpc("say", me)
	elif phase == "chatting" and chat.calls.size() >= clients - 1:
		phase = "lingering"
		linger_until = OS.get_ticks_msec() + LINGER_MS
	elif phase == "lingering" and OS.get_ticks_msec() > linger_until:
		phase = "closing"
		report({"event": "close"})
		client.disconnect_from_host(1000, "done")
	elif phase == "closing":
		if client.get_connection_status() == NetworkedMultiplayerPeer.CONNECTION_DISCONNECTED:
			end_run(0)
	return false


func echo(round_no: int) -> void:
	var args := [1, "echo", round_no] + echo_args(round_no)
	lobby.callv("rpc_id", args)


# -- what comes in ------------------------------------------------------------------------


func on_reply(sender: int, round_no: int, values: Array, seen: int) -> void:
	replies += 1
	var same := var2str(values) == var2str(echo_args(round_no))
	report({
		"event": "reply", "from": sender, "round": round_no, "seen": seen, "same": same,
		"values": var2str(values), "phase": phase,
	})
	if sender != 1 or seen != me or not same:
		fail("reply %d from %d (seen %d): %s" % [round_no, sender, seen, var2str(values)])
	if round_no == 1 and phase == "echo_1":
		phase = "echo_2"
		echo(2)
	elif round_no == 2 and phase == "echo_2":
		phase = "query"
		lobby.rset_id(1, "score", me)
		lobby.rset_id(1, "secret", me)
		lobby.rpc_id(1, "echo", 3)
		lobby.rpc_id(1, "not_remote")
		lobby.rpc_id(1, "no_such_method")
		lobby.rpc_id(1, "query")
	else:
		fail("reply %d in phase %s" % [round_no, phase])


func on_state(sender: int, score, secret) -> void:
	report({"event": "state", "from": sender, "score": score, "secret": secret, "phase": phase})
	if sender != 1 or phase != "query":
		fail("state from %d in phase %s" % [sender, phase])
	phase = "ready"
	lobby.rpc_id(1, "client_ready")


func on_broadcast(sender: int, n, text) -> void:
	broadcasts += 1
	report({
		"event": "broadcast", "from": sender, "n": n, "text": text, "hp": lobby.hp,
		"tag": lobby.tag, "count": broadcasts, "phase": phase, "board": board.calls,
	})
	if phase == "ready":
		phase = "chat_wait"
		clients = int(n)
	else:
		fail("broadcast %d in phase %s" % [broadcasts, phase])


func _on_peer_connected(id: int) -> void:
	known[id] = true


func _on_connected_to_server() -> void:
	me = get_network_unique_id()
	report({"event": "connected_to_server", "id": me})
	phase = "echo_1"
	echo(1)


func _on_connection_failed() -> void:
	# Godot 3.2.3's WebSocketClient in multiplayer mode reports every end of the
	# connection, its own clean close included, as connection_failed.
	report({"event": "connection_failed", "phase": phase})
	end_run(0 if phase == "closing" else 3)


func _on_server_disconnected() -> void:
	report({"event": "server_disconnected", "phase": phase})
	end_run(0 if phase == "closing" else 3)


func _on_connection_closed(was_clean: bool) -> void:
	report({"event": "connection_closed", "was_clean": was_clean, "phase": phase})
	if phase == "closing":
		end_run(0)
