"""The Redis backend (``redis://``, ``rediss://``, ``unix://``): the same store on a Redis server.

Every operation that changes state is one Lua script, so it is atomic on the server and needs no
client-side lock; reads are single commands or read-only scripts. Redis 7.0 or later is needed
(stream ids numbered by the server, ``XADD 0-*``); Redis Cluster is not supported (the scripts
touch keys they compute).

Key layout, for namespace ``N`` (``?namespace=``, default ``sharedkv``)::

    N:k:<key>        hash {v: value, r: revision[, e: owner token, x: deadline ms]}
    N:meta           hash {msgs, dropped}: messages published and lost by slow subscribers
    N:hist           stream of the last ``history`` changes, id "0-<revision>", fields o
                     (s/d/e), k (key)[, v (value)]; read by watch(since=). Its ids are the
                     store's revisions: Redis numbers them (XADD 0-*), even when trimmed
    N:exp            sorted set key -> deadline (server ms), to record "expire" events
    N:c:<channel>    stream of the last ``buffer`` messages, id "<msg id>-<seq>",
                     fields p (payload), q (msg id of the previous message); kept only while
                     the channel has subscribers, and for a day after its last message
    N:cm:<channel>   string "<seq> <msg id>" of the channel's last message
    N:q:<name>       list: a queue
    N:l:<name>       sorted set ident -> lease deadline: holders of a lock or semaphore
    N:lo:<name>      hash ident -> "pid|thread id|since|thread name"

Pub/sub channels carry wake-up *hints* only, never data: ``N:h:k:<key>`` (a key changed),
``N:h:m:<channel>`` (a message was stored), ``N:h:q:<name>``, ``N:h:l:<name>`` (a queue or lock
changed) and ``N:h:x:<token>`` (a process's own control channel). One background thread per
backend holds a subscribed connection, routes hints to local feeds, and renews leases. Readers
then fetch the data with ordinary commands, so a lost hint (during a reconnect) costs only a
re-read, never data.

Names in hint channels fold every non-ASCII character to one byte, the last byte of its UTF-8
encoding (one of 64), so that a Redis glob ``?`` matches exactly one character, as
:func:`fnmatch.fnmatchcase` does. Folding can only make Redis match more (two characters that
fold alike); receivers filter exactly with fnmatch, so the only effect is a spurious wake-up, or
a ``publish`` count that includes a subscription which then ignores the message.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import logging
import math
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Concatenate, ParamSpec, TypeVar, cast
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    NoScriptError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from .._errors import (
    BackendError,
    BackendUnavailableError,
    ClosedError,
    InvalidURLError,
    RevisionTooOldError,
    StoreFullError,
)
from ._notify import glob_matches
from .base import Backend, Feed, Gap, HintedFeed, LockInfo, Record

__all__ = ["RedisBackend"]

log = logging.getLogger("sharedkv")

P = ParamSpec("P")
R = TypeVar("R")

DEFAULT_NAMESPACE = "sharedkv"
DEFAULT_TIMEOUT = 5.0  # seconds: connect, socket and subscription timeout
DEFAULT_LEASE = 10.0  # seconds a lock or ephemeral key outlives a silent holder
CHANNEL_LIFETIME_MS = 24 * 3600 * 1000  # a channel's buffer outlives its last message this long
MIN_REDIS = (7, 0)

_SCAN_COUNT = 1000
_HISTORY_PAGE = 1000
_SWEEP_BATCH = 256
_RETRY_MIN, _RETRY_MAX = 0.05, 2.0  # reconnect backoff of the background thread, seconds
_NAMESPACE_RE = re.compile(r"^[!-9;-~]{1,64}$")  # printable ASCII without ':' or space
_OWN_QUERY = ("namespace", "timeout", "lease")
_PASSED_QUERY = (
    "db",
    "ssl_cert_reqs",
    "ssl_ca_certs",
    "ssl_ca_path",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_check_hostname",
)
_TUNING = {
    "history": 4096,
    "history_bytes": 32 << 20,
    "buffer": 1024,
    "buffer_bytes": 8 << 20,
}
_OPS = {b"s": "set", b"d": "delete", b"e": "expire"}

_forks = 0  # bumped in every forked child: backends compare it to notice a fork cheaply


def _count_fork() -> None:
    global _forks
    _forks += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_count_fork)


# =============================================================================================
# Lua scripts
# =============================================================================================

# Helpers every script may use: server time, name folding, and trimming of a capped stream.
_LUA_HELPERS = r"""
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Hint channels name keys and channels with each non-ASCII character folded to one byte (the
-- last of its UTF-8 sequence), so a Redis '?' matches one character as Python's fnmatch does.
local function last_byte(sequence) return string.sub(sequence, -1) end
local function fold(name)
  if not string.find(name, '[\128-\255]') then return name end
  return (string.gsub(name, '[\192-\255][\128-\191]*', last_byte))
end

-- Trimming a capped stream on every write would cost more than the write: it runs every
-- period writes (1/16 of the limit, at most 64), and at once after a large value. So a stream
-- holds between max_len and max_len + period entries, and about max_bytes bytes as Redis
-- counts them (MEMORY USAGE); the newest entry always stays.
local function trim_period(max_len)
  return math.max(1, math.min(64, math.floor(max_len / 16)))
end

local function trim(stream, counter, size, max_len, max_bytes)
  if counter % trim_period(max_len) ~= 0 and size * 64 < max_bytes then return end
  local len = redis.call('XLEN', stream)
  if len > max_len then
    redis.call('XTRIM', stream, 'MAXLEN', max_len)
    len = max_len
  end
  local used = redis.call('MEMORY', 'USAGE', stream, 'SAMPLES', 0) or 0
  if used > max_bytes and len > 1 then
    redis.call('XTRIM', stream, 'MAXLEN', math.max(1, math.floor(len * 0.9 * max_bytes / used)))
  end
end
"""

# Shared by every script that changes keys. KEYS: the data keys it changes ("N:k:<key>").
# ARGV[1..3]: the namespace prefix "N:", the history limits in entries and in bytes.
# Revisions are the ids of the history stream ("0-<revision>", Redis numbers them with 0-*),
# so that a change costs one command less; the stream keeps its last id even when trimmed.
_LUA_CHANGES = (
    _LUA_HELPERS
    + r"""
local NS = ARGV[1]
local HIST, EXP = NS .. 'hist', NS .. 'exp'
local HIST_MAX, HIST_BYTES = tonumber(ARGV[2]), tonumber(ARGV[3])

-- One change: a new store-wide revision, a history entry and a hint to watchers of the key.
-- op: 's' set (value given), 'd' delete, 'e' expire. flag: 'x' when the key now has a
-- deadline (watching processes then plan their expiry sweep), '.' otherwise.
local function record(op, key, value, flag)
  local id
  if value then
    id = redis.call('XADD', HIST, '0-*', 'o', op, 'k', key, 'v', value)
  else
    id = redis.call('XADD', HIST, '0-*', 'o', op, 'k', key)
  end
  local rev = tonumber(string.sub(id, 3))
  trim(HIST, rev, value and #value or 0, HIST_MAX, HIST_BYTES)
  redis.call('PUBLISH', NS .. 'h:k:' .. fold(key), flag .. key)
  return rev
end

-- A key whose deadline passed is already gone in Redis; record its "expire" before anything
-- else happens to it. Returns true while the key is live and has a deadline (or is ephemeral).
local function settle(data, key)
  if not redis.call('ZSCORE', EXP, key) then return false end
  if redis.call('EXISTS', data) == 1 then return true end
  redis.call('ZREM', EXP, key)
  record('e', key, nil, '.')
  return false
end

-- Store value under key with a new revision. ttl_ms: '' or milliseconds. owner: '' or the
-- token of the process whose lease (lease_ms) keeps this ephemeral key alive. tracked: the
-- key had a deadline, so its old expiry and fields must go (a plain key is overwritten as is).
local function write(data, key, value, ttl_ms, owner, lease_ms, tracked)
  local now, deadline = nil, nil
  if ttl_ms ~= '' or owner ~= '' then now = now_ms() end
  if ttl_ms ~= '' then deadline = now + tonumber(ttl_ms) end
  local rev = record('s', key, value, (deadline or owner ~= '') and 'x' or '.')
  if tracked then redis.call('DEL', data) end
  if owner == '' then
    redis.call('HSET', data, 'v', value, 'r', rev)
  else
    redis.call('HSET', data, 'v', value, 'r', rev, 'e', owner)
    if deadline then redis.call('HSET', data, 'x', string.format('%d', deadline)) end
    local lease_end = now + tonumber(lease_ms)
    if not deadline or lease_end < deadline then deadline = lease_end end
  end
  if deadline then
    redis.call('PEXPIREAT', data, string.format('%d', deadline))
    redis.call('ZADD', EXP, string.format('%d', deadline), key)
  elseif tracked then
    redis.call('ZREM', EXP, key)
  end
  return rev
end
"""
)

# The store's current revision: the last id the history stream handed out (0 before any).
_LUA_CURRENT_REVISION = r"""
local function current_revision(hist)
  local last = redis.call('XREVRANGE', hist, '+', '-', 'COUNT', 1)[1]
  if last then return tonumber(string.sub(last[1], 3)) end
  if redis.call('EXISTS', hist) == 0 then return 0 end
  local info = redis.call('XINFO', 'STREAM', hist)  -- emptied by history=0: ask for its last id
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then return tonumber(string.sub(info[i + 1], 3)) end
  end
  return 0
end
"""

# set: KEYS[1] data key; ARGV[4] key, [5] value, [6] options: '' or "ttl ms|required
# revision|owner token|lease ms" (each part may be empty). Returns the revision, or 0 when
# the required revision did not match.
_LUA_SET = (
    _LUA_CHANGES
    + r"""
local data, key = KEYS[1], ARGV[4]
local ttl, required, owner, lease = '', '', '', ''
if ARGV[6] ~= '' then
  ttl, required, owner, lease = string.match(ARGV[6], '^(%d*)|(%d*)|(%x*)|(%d*)$')
end
local tracked = settle(data, key)
if required ~= '' and (redis.call('HGET', data, 'r') or '0') ~= required then return 0 end
return write(data, key, ARGV[5], ttl, owner, lease, tracked)
"""
)

# set_many: KEYS data keys; ARGV[4] ttl ms or '', then key and value pairs from ARGV[5].
# Returns the revision of the last write.
_LUA_SET_MANY = (
    _LUA_CHANGES
    + r"""
local rev = 0
for i = 1, #KEYS do
  local j = 5 + (i - 1) * 2
  local tracked = settle(KEYS[i], ARGV[j])
  rev = write(KEYS[i], ARGV[j], ARGV[j + 1], ARGV[4], '', '0', tracked)
end
return rev
"""
)

# delete: KEYS[1] data key; ARGV[4] key, [5] required revision or ''. Returns 1 when removed.
_LUA_DELETE = (
    _LUA_CHANGES
    + r"""
local data, key = KEYS[1], ARGV[4]
local tracked = settle(data, key)
if ARGV[5] ~= '' and redis.call('HGET', data, 'r') ~= ARGV[5] then return 0 end
if redis.call('DEL', data) == 0 then return 0 end
if tracked then redis.call('ZREM', EXP, key) end
record('d', key, nil, '.')
return 1
"""
)

# pop: KEYS[1] data key; ARGV[4] key. Returns the removed value, or nil.
_LUA_POP = (
    _LUA_CHANGES
    + r"""
local data, key = KEYS[1], ARGV[4]
local tracked = settle(data, key)
local value = redis.call('HGET', data, 'v')
if not value then return false end
redis.call('DEL', data)
if tracked then redis.call('ZREM', EXP, key) end
record('d', key, nil, '.')
return value
"""
)

# incr: KEYS[1] data key; ARGV[4] key, [5] amount (fits 64 bits). Returns {new decimal value},
# {'type'} when the stored value is not an integer, or {'range'} when the result does not fit
# 64 bits (the client then falls back to compare-and-set with Python's integers). The key's
# expiry and ephemeral owner are kept: the hash is changed in place.
_LUA_INCR = (
    _LUA_CHANGES
    + r"""
local data, key = KEYS[1], ARGV[4]
settle(data, key)
local result = redis.pcall('HINCRBY', data, 'v', ARGV[5])
if type(result) == 'table' and result.err then
  local old = redis.call('HGET', data, 'v')
  if old and not string.find(old, '^[%-0-9]') then return {'type'} end
  return {'range'}
end
-- Lua numbers are doubles: beyond 2^53 read the exact decimal back.
local new = math.abs(result) < 2^53 and string.format('%d', result) or redis.call('HGET', data, 'v')
redis.call('HSET', data, 'r', record('s', key, new, '.'))
return {new}
"""
)

# expire: KEYS[1] data key; ARGV[4] key, [5] ttl ms or '' (remove the expiry), [6] lease ms.
# Rewrites the value with a new revision as set(ttl=...) would, keeping an ephemeral owner.
# Returns 0 when the key is absent.
_LUA_EXPIRE = (
    _LUA_CHANGES
    + r"""
local data, key = KEYS[1], ARGV[4]
local tracked = settle(data, key)
local h = redis.call('HMGET', data, 'v', 'e', 'x')
if not h[1] then return 0 end
local owner = h[2] or ''
if ARGV[5] == '' and not h[3] and (owner ~= '' or redis.call('PTTL', data) < 0) then
  return 1
end
write(data, key, h[1], ARGV[5], owner, ARGV[6], tracked)
return 1
"""
)

# clear: KEYS data keys, ARGV[4..] their keys in the same order. Deletes those still present.
_LUA_CLEAR = (
    _LUA_CHANGES
    + r"""
local n = 0
for i = 1, #KEYS do
  local key = ARGV[i + 3]
  local tracked = settle(KEYS[i], key)
  if redis.call('DEL', KEYS[i]) == 1 then
    if tracked then redis.call('ZREM', EXP, key) end
    record('d', key, nil, '.')
    n = n + 1
  end
end
return n
"""
)

# sweep: record "expire" for keys whose deadline passed (at most ARGV[4] of them). Returns the
# milliseconds until the next deadline, -1 when there is none, 0 to be called again at once.
_LUA_SWEEP = (
    _LUA_CHANGES
    + r"""
local now = now_ms()
local limit = tonumber(ARGV[4])
local due = redis.call('ZRANGEBYSCORE', EXP, '-inf', string.format('(%d', now), 'LIMIT', 0, limit)
for _, key in ipairs(due) do
  local left = redis.call('PTTL', NS .. 'k:' .. key)
  if left == -2 then
    redis.call('ZREM', EXP, key)
    record('e', key, nil, '.')
  elseif left == -1 then
    redis.call('ZREM', EXP, key)
  else
    redis.call('ZADD', EXP, string.format('%d', now + left), key)
  end
end
if #due >= limit then return 0 end
local first = redis.call('ZRANGE', EXP, 0, 0, 'WITHSCORES')
if not first[2] then return -1 end
return math.max(1, tonumber(first[2]) - now + 1)
"""
)

# drop_ephemeral: KEYS data keys; ARGV[4] owner token, ARGV[5..] their keys. Deletes the keys
# this owner still holds (a clean close), recording a "delete" for each.
_LUA_DROP_EPHEMERAL = (
    _LUA_CHANGES
    + r"""
for i = 1, #KEYS do
  local key = ARGV[i + 4]
  local tracked = settle(KEYS[i], key)
  if redis.call('HGET', KEYS[i], 'e') == ARGV[4] then
    redis.call('DEL', KEYS[i])
    if tracked then redis.call('ZREM', EXP, key) end
    record('d', key, nil, '.')
  end
end
return 0
"""
)

# renew_ephemeral: KEYS[1] expiry set; ARGV[1] data key prefix, [2] owner token, [3] lease ms,
# [4..] keys. Extends the lease of the keys this owner still holds (never past a ttl the
# user gave); returns the keys it no longer holds.
_LUA_RENEW_EPHEMERAL = (
    _LUA_HELPERS
    + r"""
local now = now_ms()
local lost = {}
for i = 4, #ARGV do
  local key = ARGV[i]
  local data = ARGV[1] .. key
  local h = redis.call('HMGET', data, 'e', 'x')
  if h[1] ~= ARGV[2] then
    lost[#lost + 1] = key
  else
    local deadline = now + tonumber(ARGV[3])
    if h[2] and tonumber(h[2]) < deadline then deadline = tonumber(h[2]) end
    redis.call('PEXPIREAT', data, string.format('%d', deadline))
    redis.call('ZADD', KEYS[1], string.format('%d', deadline), key)
  end
end
return lost
"""
)

# get_record: KEYS[1] data key. Returns {value, revision, ms left or -1}, or nil when absent.
# An ephemeral key's own lease is not its ttl: only a ttl the user gave (field x) is reported.
_LUA_GET_RECORD = (
    _LUA_HELPERS
    + r"""
local h = redis.call('HMGET', KEYS[1], 'v', 'r', 'e', 'x')
if not h[1] then return false end
local left = -1
if not h[3] then
  left = redis.call('PTTL', KEYS[1])
elseif h[4] then
  left = math.max(0, tonumber(h[4]) - now_ms())
end
return {h[1], h[2], left}
"""
)

# get_many: KEYS data keys. Returns their values (nil where absent), read at one instant.
_LUA_GET_MANY = r"""
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('HGET', key, 'v') end
return out
"""

# scan_items: ARGV[1] cursor, [2] MATCH pattern, [3] COUNT. One SCAN step and the values of
# the keys it found, read at one instant. Returns {next cursor, keys, values}.
_LUA_SCAN_ITEMS = r"""
local step = redis.call('SCAN', ARGV[1], 'MATCH', ARGV[2], 'COUNT', ARGV[3])
local keys, values = {}, {}
for _, key in ipairs(step[2]) do
  local value = redis.call('HGET', key, 'v')
  if value then
    keys[#keys + 1] = key
    values[#values + 1] = value
  end
end
return {step[1], keys, values}
"""

# publish: KEYS[1] meta hash, [2] channel stream, [3] channel state "seq last-msg-id";
# ARGV[1] hint channel, [2] channel name, [3] payload, [4] buffer (messages), [5] buffer bytes,
# [6] buffer lifetime ms. The message is stored only when a subscription received the hint
# (the script is atomic, so subscribers read it only after it is stored). Entries have id
# "<msg id>-<seq>" and name the previous message of the channel (q), so that a reader can
# tell it missed some. Returns the number of subscriptions reached.
_LUA_PUBLISH = (
    _LUA_HELPERS
    + r"""
local reached = redis.call('PUBLISH', ARGV[1], ARGV[2])
if reached == 0 then return 0 end
local msgid = redis.call('HINCRBY', KEYS[1], 'msgs', 1)
local state = redis.call('GET', KEYS[3])
local seq, previous = 1, '0'
if state then
  local space = string.find(state, ' ')
  seq = tonumber(string.sub(state, 1, space - 1)) + 1
  previous = string.sub(state, space + 1)
end
redis.call('XADD', KEYS[2], string.format('%d-%d', msgid, seq), 'p', ARGV[3], 'q', previous)
redis.call('PEXPIRE', KEYS[2], ARGV[6])
redis.call('SET', KEYS[3], string.format('%d %d', seq, msgid), 'PX', ARGV[6])
trim(KEYS[2], seq, #ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]))
return reached
"""
)

# history_bounds: KEYS[1] history. {current revision, revision of the oldest retained change
# or nil}, read at one instant.
_LUA_HISTORY_BOUNDS = (
    _LUA_CURRENT_REVISION
    + r"""
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1]
return {current_revision(KEYS[1]), first and tonumber(string.sub(first[1], 3)) or false}
"""
)

# revision: KEYS[1] history. The store's current revision.
_LUA_REVISION = _LUA_CURRENT_REVISION + "\nreturn current_revision(KEYS[1])\n"

# channel_marks: KEYS[1] meta hash, KEYS[2..] channel states. Where messages and the given
# channels stood when a subscription started: {msg id, state of each channel or false}.
_LUA_CHANNEL_MARKS = r"""
local out = {redis.call('HGET', KEYS[1], 'msgs') or '0'}
for i = 2, #KEYS do out[i] = redis.call('GET', KEYS[i]) end
return out
"""

# queue_put: KEYS[1] list; ARGV[1] item, [2] maxsize (0: unbounded), [3] hint channel.
# Returns 1 when appended, 0 when the queue is full.
_LUA_QUEUE_PUT = r"""
local maxsize = tonumber(ARGV[2])
if maxsize > 0 and redis.call('LLEN', KEYS[1]) >= maxsize then return 0 end
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('PUBLISH', ARGV[3], '')
return 1
"""

# queue_get: KEYS[1] list; ARGV[1] hint channel (wakes bounded putters). Returns the item or nil.
_LUA_QUEUE_GET = r"""
local item = redis.call('LPOP', KEYS[1])
if item then redis.call('PUBLISH', ARGV[1], '') end
return item
"""

# queue_put_many: KEYS[1] list; ARGV[1] maxsize (0: unbounded), [2] hint channel, [3..] items.
# Returns 1 when every item was appended, 0 (nothing appended) when they do not all fit.
# RPUSH takes the items a thousand at a time: Lua's unpack() is limited by its C stack.
_LUA_QUEUE_PUT_MANY = r"""
local maxsize = tonumber(ARGV[1])
if maxsize > 0 and redis.call('LLEN', KEYS[1]) + #ARGV - 2 > maxsize then return 0 end
for first = 3, #ARGV, 1000 do
  redis.call('RPUSH', KEYS[1], unpack(ARGV, first, math.min(first + 999, #ARGV)))
end
redis.call('PUBLISH', ARGV[2], '')
return 1
"""

# queue_get_many: KEYS[1] list; ARGV[1] max items, [2] hint channel. Returns the items or nil.
_LUA_QUEUE_GET_MANY = r"""
local items = redis.call('LPOP', KEYS[1], ARGV[1])
if items then redis.call('PUBLISH', ARGV[2], '') end
return items
"""

# Shared by the lock scripts: KEYS[1] holders (ident -> lease deadline), KEYS[2] holder info.
_LUA_LOCKS = (
    _LUA_HELPERS
    + r"""
local HOLDERS, INFO = KEYS[1], KEYS[2]

-- Holders whose lease ran out are presumed dead: forget them.
local function purge(now)
  local bound = string.format('(%d', now)
  for _, ident in ipairs(redis.call('ZRANGEBYSCORE', HOLDERS, '-inf', bound)) do
    redis.call('HDEL', INFO, ident)
  end
  redis.call('ZREMRANGEBYSCORE', HOLDERS, '-inf', bound)
end

-- Both keys outlive every lease in them (a lock nobody renews disappears on its own).
local function keep_alive(z, info, ms)
  if redis.call('PTTL', z) < ms then
    redis.call('PEXPIRE', z, ms)
    redis.call('PEXPIRE', info, ms)
  end
end
"""
)

# lock_acquire: ARGV[1] ident, [2] limit, [3] lease ms, [4] holder info. Returns 1 when taken.
_LUA_LOCK_ACQUIRE = (
    _LUA_LOCKS
    + r"""
local now = now_ms()
purge(now)
if redis.call('ZCARD', HOLDERS) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', HOLDERS, string.format('%d', now + tonumber(ARGV[3])), ARGV[1])
redis.call('HSET', INFO, ARGV[1], ARGV[4])
keep_alive(HOLDERS, INFO, tonumber(ARGV[3]) + 1000)
return 1
"""
)

# lock_release: ARGV[1] ident, [2] hint channel. Returns 1 when that ident held the lock.
_LUA_LOCK_RELEASE = r"""
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('PUBLISH', ARGV[2], '')
return 1
"""

# lock_owners: the live holders, as a flat list of ident, info pairs.
_LUA_LOCK_OWNERS = (
    _LUA_LOCKS
    + r"""
purge(now_ms())
return redis.call('HGETALL', INFO)
"""
)

# renew_locks: KEYS pairs (holders, info) for each ARGV[2..] ident; ARGV[1] lease ms. Extends
# the leases still held; returns the idents that were lost (expired and purged by another).
_LUA_RENEW_LOCKS = (
    _LUA_HELPERS
    + r"""
local now = now_ms()
local lease = tonumber(ARGV[1])
local lost = {}
for i = 2, #ARGV do
  local z, info, ident = KEYS[2 * i - 3], KEYS[2 * i - 2], ARGV[i]
  if redis.call('ZSCORE', z, ident) then
    redis.call('ZADD', z, string.format('%d', now + lease), ident)
    if redis.call('PTTL', z) < lease + 1000 then
      redis.call('PEXPIRE', z, lease + 1000)
      redis.call('PEXPIRE', info, lease + 1000)
    end
  else
    lost[#lost + 1] = ident
  end
end
return lost
"""
)


class _Script:
    """One Lua script, run by its SHA1 digest and loaded again when the server forgot it."""

    __slots__ = ("sha", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()

    def __call__(self, call: _Commands, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        try:
            return call("EVALSHA", self.sha, len(keys), *keys, *args)
        except NoScriptError:
            # A restarted server (or SCRIPT FLUSH) forgets scripts; this is rare, so no lock.
            call("SCRIPT", "LOAD", self.text)
            return call("EVALSHA", self.sha, len(keys), *keys, *args)


# redis-py 5.3 made get_connection's arguments optional (and later deprecated them).
_TAKE_NEEDS_NAME = (
    inspect.signature(redis.ConnectionPool.get_connection).parameters.get("command_name")
    is not None
    and inspect.signature(redis.ConnectionPool.get_connection).parameters["command_name"].default
    is inspect.Parameter.empty
)


class _Commands:
    """Commands on pooled connections, through redis-py's connection API only.

    redis-py's client adds work to every command that sharedkv does not use (retry and
    observability hooks, reply callbacks): on loopback that is about a third of a call, so
    the hot path skips it. Replies are raw (RESP2 or RESP3 as redis-py negotiated). A broken
    connection is disconnected by redis-py and replaced by the pool on next use.
    """

    __slots__ = ("_pool",)

    def __init__(self, pool: redis.ConnectionPool) -> None:
        self._pool = pool

    def _take(self) -> Any:
        if _TAKE_NEEDS_NAME:
            return self._pool.get_connection("_")  # type: ignore[call-arg, unused-ignore]
        return self._pool.get_connection()

    def __call__(self, *args: Any) -> Any:
        conn = self._take()
        try:
            conn.send_command(*args)
            return conn.read_response()
        finally:
            self._pool.release(conn)

    def many(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Several commands in one round trip (pipelined, not atomic)."""
        conn = self._take()
        try:
            conn.send_packed_command(conn.pack_commands(commands))
            return [conn.read_response() for _ in commands]
        finally:
            self._pool.release(conn)


SET = _Script(_LUA_SET)
SET_MANY = _Script(_LUA_SET_MANY)
DELETE = _Script(_LUA_DELETE)
POP = _Script(_LUA_POP)
INCR = _Script(_LUA_INCR)
EXPIRE = _Script(_LUA_EXPIRE)
CLEAR = _Script(_LUA_CLEAR)
SWEEP = _Script(_LUA_SWEEP)
DROP_EPHEMERAL = _Script(_LUA_DROP_EPHEMERAL)
RENEW_EPHEMERAL = _Script(_LUA_RENEW_EPHEMERAL)
GET_RECORD = _Script(_LUA_GET_RECORD)
GET_MANY = _Script(_LUA_GET_MANY)
SCAN_ITEMS = _Script(_LUA_SCAN_ITEMS)
PUBLISH = _Script(_LUA_PUBLISH)
CHANNEL_MARKS = _Script(_LUA_CHANNEL_MARKS)
HISTORY_BOUNDS = _Script(_LUA_HISTORY_BOUNDS)
REVISION = _Script(_LUA_REVISION)
QUEUE_PUT = _Script(_LUA_QUEUE_PUT)
QUEUE_GET = _Script(_LUA_QUEUE_GET)
QUEUE_PUT_MANY = _Script(_LUA_QUEUE_PUT_MANY)
QUEUE_GET_MANY = _Script(_LUA_QUEUE_GET_MANY)
LOCK_ACQUIRE = _Script(_LUA_LOCK_ACQUIRE)
LOCK_RELEASE = _Script(_LUA_LOCK_RELEASE)
LOCK_OWNERS = _Script(_LUA_LOCK_OWNERS)
RENEW_LOCKS = _Script(_LUA_RENEW_LOCKS)


# =============================================================================================
# Addresses
# =============================================================================================


@dataclass(frozen=True)
class _Address:
    """A parsed Redis address: where the server is and how to log in."""

    scheme: str  # redis, rediss or unix
    host: str
    port: int
    path: str  # unix socket path
    db: int
    username: str | None
    password: str | None
    extra: tuple[tuple[str, str], ...]  # TLS options, passed to redis-py as they are

    @property
    def where(self) -> str:
        """The server, for messages (never the password)."""
        if self.scheme == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def url(self, query: list[tuple[str, str]]) -> str:
        auth = ""
        if self.username or self.password is not None:
            auth = quote(self.username or "", safe="")
            if self.password is not None:
                auth += ":" + quote(self.password, safe="")
            auth += "@"
        if self.scheme == "unix":
            query = [("db", str(self.db)), *query]
            location = quote(self.path)
        else:
            location = f"{self.where}/{self.db}"
        return f"{self.scheme}://{auth}{location}?{urlencode([*query, *self.extra])}"

    def pool(self, timeout: float) -> redis.ConnectionPool:
        """A new connection pool: no automatic retries (a retried script could run twice)."""
        kwargs: dict[str, Any] = {
            "db": self.db,
            "username": self.username,
            "password": self.password,
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0),
        }
        if self.scheme == "unix":
            return redis.ConnectionPool(
                connection_class=redis.UnixDomainSocketConnection, path=self.path, **kwargs
            )
        kwargs.update(host=self.host, port=self.port, socket_keepalive=True)
        kwargs["socket_keepalive_options"] = _keepalive_options()
        if self.scheme == "rediss":
            kwargs.update(self.extra)
            return redis.ConnectionPool(connection_class=redis.SSLConnection, **kwargs)
        return redis.ConnectionPool(connection_class=redis.Connection, **kwargs)


def _keepalive_options() -> dict[int, int]:
    # A subscribed connection may sit idle for hours: let the kernel notice a vanished server
    # within about a minute instead of the default two hours.
    wanted = {"TCP_KEEPIDLE": 30, "TCP_KEEPINTVL": 10, "TCP_KEEPCNT": 3}
    return {getattr(socket, k): v for k, v in wanted.items() if hasattr(socket, k)}


def _parse_address(url: str) -> tuple[_Address, dict[str, str]]:
    """The server address and the sharedkv options (namespace, timeout, lease) of ``url``."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = set(query) - set(_OWN_QUERY) - set(_PASSED_QUERY)
    if unknown:
        raise InvalidURLError(f"unknown option(s) in {url!r}: {', '.join(sorted(unknown))}")
    own = {k: query.pop(k) for k in _OWN_QUERY if k in query}
    try:
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password is not None else None
        if scheme == "unix":
            host, port, path = "", 0, unquote(parts.path)
            if not path:
                raise InvalidURLError(
                    f"unix addresses need a socket path: unix:///path, not {url!r}"
                )
            db_text = query.pop("db", "0")
        else:
            host, port, path = parts.hostname or "localhost", parts.port or 6379, ""
            db_text = query.pop("db", "") or parts.path.strip("/") or "0"
        db = int(db_text)
    except ValueError as exc:
        raise InvalidURLError(f"bad Redis address {url!r}: {exc}") from None
    if db < 0:
        raise InvalidURLError(f"bad Redis database number in {url!r}")
    extra = tuple(sorted(query.items()))
    if extra and scheme != "rediss":
        raise InvalidURLError(f"TLS options need a rediss:// address, not {url!r}")
    return _Address(scheme, host, port, path, db, username, password, extra), own


def _number(name: str, value: Any, minimum: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidURLError(f"option {name}={value!r} must be a number of seconds") from None
    if not math.isfinite(number) or number < minimum:
        raise InvalidURLError(f"option {name}={value!r} must be at least {minimum}")
    return number


def _tuning(options: dict[str, Any]) -> dict[str, int]:
    out = dict(_TUNING)
    for name in _TUNING:
        if name not in options:
            continue
        value = options.pop(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"store option {name} must be an int >= 0, not {value!r}")
        out[name] = value
    out["buffer"] = max(1, out["buffer"])
    return out


# =============================================================================================
# Globs: Python's fnmatch patterns as Redis patterns
# =============================================================================================


def _fold(name: str) -> bytes:
    """``name`` with each non-ASCII character folded to one byte (see the module doc)."""
    if name.isascii():
        return name.encode()
    return bytes(_fold_char(ord(c)) for c in name)


def _fold_char(code: int) -> int:
    # The last byte of a multi-byte UTF-8 sequence: 0b10xxxxxx with the low 6 bits of the code.
    return code if code < 128 else 0x80 | (code & 0x3F)


def _escape_glob(text: str, *, fold: bool = False) -> bytes:
    """``text`` as a Redis glob that matches exactly ``text`` (folded, with ``fold``)."""
    return b"".join(_literal(c, fold) for c in text)


def _literal(char: str, fold: bool) -> bytes:
    if ord(char) >= 128:
        return bytes([_fold_char(ord(char))]) if fold else char.encode()
    if char in "*?[]\\":
        return b"\\" + char.encode()
    return char.encode()


def _redis_glob(pattern: str, *, fold: bool) -> bytes:
    """A Redis glob matching at least every name that ``fnmatchcase(name, pattern)`` matches.

    With ``fold``, names are folded (one byte per character), so ``?`` and classes translate
    exactly for ASCII. Without it (real UTF-8 key names, for SCAN), a character may be several
    bytes, so ``?`` becomes ``?*`` and non-ASCII classes become ``?*``: wider, never narrower.
    Callers filter exactly with fnmatch afterwards.
    """
    out = bytearray()
    i, n = 0, len(pattern)
    while i < n:
        char = pattern[i]
        i += 1
        if char == "*":
            out += b"*"
        elif char == "?":
            out += b"?" if fold else b"?*"
        elif char == "[" and (end := _class_end(pattern, i)) >= 0:
            out += _redis_class(pattern[i:end], fold)
            i = end + 1
        else:
            out += _literal(char, fold)
    return bytes(out)


def _class_end(pattern: str, start: int) -> int:
    """Index of the ``]`` closing a class opened before ``start`` (fnmatch's rules), or -1."""
    j = start
    if j < len(pattern) and pattern[j] == "!":
        j += 1
    if j < len(pattern) and pattern[j] == "]":
        j += 1
    while j < len(pattern) and pattern[j] != "]":
        j += 1
    return j if j < len(pattern) else -1


def _redis_class(body: str, fold: bool) -> bytes:
    """One fnmatch class (``body`` between the brackets) as a Redis class, or a wider glob."""
    any_char = b"?" if fold else b"?*"
    negate = body.startswith("!")
    items = _class_items(body[1:] if negate else body)
    if not fold and (negate or any(ord(last) >= 128 for _, last in items)):
        return any_char  # unfolded, a class matches one character, which may be several bytes
    out = bytearray()
    for first, last in items:
        if first in "\\]^-[" or last in "\\]^-[":
            if first != last:
                return any_char  # Redis cannot escape the ends of a range
            out += b"\\" + first.encode()
            continue
        ascii_last = min(ord(last), 127)
        if ord(first) <= ascii_last:
            out += (
                first.encode()
                if ord(first) == ascii_last
                else f"{first}-{chr(ascii_last)}".encode()
            )
        if ord(last) >= 128 and not negate:
            # Folded characters share 64 bytes; a negated class must keep matching them all.
            out += _folded_range(max(ord(first), 128), ord(last))
    if not out:
        return any_char
    return (b"[^" if negate else b"[") + bytes(out) + b"]"


def _class_items(members: str) -> list[tuple[str, str]]:
    """The (first, last) characters of each single character or range, as fnmatch reads them."""
    items = []
    k = 0
    while k < len(members):
        if k + 2 < len(members) and members[k + 1] == "-":
            items.append((members[k], members[k + 2]))
            k += 3
        else:
            items.append((members[k], members[k]))
            k += 1
    return items


def _folded_range(first: int, last: int) -> bytes:
    if last < first:
        return b""
    if last - first >= 63:
        return bytes(range(0x80, 0xC0))
    return bytes(sorted({_fold_char(code) for code in range(first, last + 1)}))


def _has_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


# =============================================================================================
# The backend
# =============================================================================================


def _guarded(
    method: Callable[Concatenate[RedisBackend, P], R],
) -> Callable[Concatenate[RedisBackend, P], R]:
    """Check the backend is open (and reconnect after a fork), and turn redis-py errors into
    sharedkv errors that name the server."""

    @functools.wraps(method)
    def wrapper(self: RedisBackend, /, *args: P.args, **kwargs: P.kwargs) -> R:
        if self._closed:
            raise ClosedError("the store is closed")
        if self._fork_generation != _forks:  # cheaper than os.getpid() on every call
            self._after_fork()
        try:
            return method(self, *args, **kwargs)
        except redis.RedisError as exc:
            raise self._translate(exc) from exc

    return wrapper


class RedisBackend(Backend):
    """The store on a Redis server; see the module docstring for the layout."""

    #: every call is network I/O: AsyncStore runs calls in a worker thread
    blocking_io = True
    max_key_bytes = 511

    def __init__(self, url: str, **options: Any) -> None:
        address, own = _parse_address(url)
        namespace = self._namespace(own, options)
        self._timeout = _number("timeout", options.pop("timeout", own.get("timeout", 5)), 0.01)
        self._lease = _number("lease", options.pop("lease", own.get("lease", 10)), 0.1)
        tuning = _tuning(options)
        if options:
            raise TypeError(f"unknown store option(s): {', '.join(sorted(options))}")
        self._address = address
        self.namespace = namespace
        self.url = address.url(self._own_query())
        self._history, self._history_bytes = tuning["history"], tuning["history_bytes"]
        self._buffer, self._buffer_bytes = tuning["buffer"], tuning["buffer_bytes"]
        self._ns = namespace + ":"
        self._kp = self._ns + "k:"
        self._kp_bytes = self._kp.encode()
        self._meta, self._hist, self._exp = self._ns + "meta", self._ns + "hist", self._ns + "exp"
        self._closed = False
        self._connect()
        try:
            self.server_version = self._check_server()
        except BaseException as exc:
            self._pool.disconnect()
            if isinstance(exc, redis.RedisError):
                raise self._translate(exc) from exc
            raise

    def _namespace(self, own: dict[str, str], options: dict[str, Any]) -> str:
        given = options.pop("namespace", None)
        in_url = own.get("namespace")
        if given is not None and in_url is not None and given != in_url:
            raise InvalidURLError(f"namespace given twice: {in_url!r} in the URL, {given!r}")
        namespace = given if given is not None else (in_url or DEFAULT_NAMESPACE)
        if not isinstance(namespace, str) or not _NAMESPACE_RE.match(namespace):
            raise InvalidURLError(
                f"bad namespace {namespace!r}: use 1-64 printable ASCII characters, no ':'"
            )
        return namespace

    def _own_query(self) -> list[tuple[str, str]]:
        query = [("namespace", self.namespace)]
        if self._timeout != DEFAULT_TIMEOUT:
            query.append(("timeout", repr(self._timeout)))
        if self._lease != DEFAULT_LEASE:
            query.append(("lease", repr(self._lease)))
        return query

    def _connect(self) -> None:
        """Everything tied to this process: pool, token, background thread, leases."""
        self._pid = os.getpid()
        self._pool = self._address.pool(self._timeout)
        self._cmd = _Commands(self._pool)
        self._fork_generation = _forks
        self._token = secrets.token_hex(8)
        self._lock = threading.Lock()
        self._held: dict[tuple[str, str], None] = {}  # (lock name, ident) -> None
        self._ephemeral: dict[str, int] = {}  # key -> generation (bumped by every set)
        self._generation = 0
        self._feeds: list[_RedisFeed] = []
        self._listener = _Listener(self)

    def _check_server(self) -> str:
        info = self._cmd("INFO", "server").decode(errors="replace")
        found = re.search(r"^redis_version:(\S+)", info, re.MULTILINE)
        version = found.group(1) if found else "0"
        numbers = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
        if numbers < MIN_REDIS:
            raise BackendError(
                f"the Redis server at {self._address.where} runs {version}; sharedkv needs "
                f"{MIN_REDIS[0]}.{MIN_REDIS[1]} or later"
            )
        return version

    def _after_fork(self) -> None:
        """In a forked child: never touch the parent's sockets, thread or leases; start anew.

        Feeds made by the parent are closed here (their wake-ups went to the parent's thread).
        """
        for feed in self._feeds:
            feed.closed = True
        self._listener.abandon()
        self._connect()

    def _translate(self, exc: redis.RedisError) -> Exception:
        where = self._address.where
        if isinstance(exc, AuthenticationError):
            return BackendError(f"Redis at {where} refused the credentials: {exc}")
        if isinstance(exc, (RedisConnectionError, RedisTimeoutError)):
            return BackendUnavailableError(
                f"Redis at {where} is unavailable (timeout {self._timeout:g} s): {exc}"
            )
        if isinstance(exc, ResponseError) and str(exc).startswith("OOM"):
            return StoreFullError(f"Redis at {where} is out of memory (maxmemory): {exc}")
        return BackendError(f"Redis at {where} failed: {exc}")

    def _changes(self, script: _Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run a key-changing script with the arguments every such script takes."""
        return script(self._cmd, keys, (self._ns, self._history, self._history_bytes, *args))

    # -- key-value -------------------------------------------------------------------------
    @_guarded
    def get(self, key: str) -> bytes | None:
        return cast("bytes | None", self._cmd("HGET", self._kp + key, "v"))

    @_guarded
    def get_record(self, key: str) -> Record | None:
        reply = GET_RECORD(self._cmd, (self._kp + key,), ())
        if reply is None:
            return None
        value, revision, left = reply
        expires_at = None if left < 0 else time.time() + left / 1000
        return Record(value, int(revision), expires_at)

    @_guarded
    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        return cast("list[bytes | None]", GET_MANY(self._cmd, [self._kp + k for k in keys], ()))

    @_guarded
    def set(
        self,
        key: str,
        value: bytes,
        *,
        ttl: float | None = None,
        if_revision: int | None = None,
        ephemeral: bool = False,
    ) -> int:
        options = ""  # the common case: no ttl, no condition, not ephemeral
        if ttl is not None or if_revision is not None or ephemeral:
            required = "" if if_revision is None else str(if_revision)
            owner = self._token if ephemeral else ""
            options = f"{_ms(ttl)}|{required}|{owner}|{_ms(self._lease)}"
        revision = int(self._changes(SET, (self._kp + key,), (key, value, options)))
        if ephemeral and revision:
            self._hold_ephemeral(key)
        return revision

    @_guarded
    def set_many(self, items: Sequence[tuple[str, bytes]], *, ttl: float | None = None) -> int:
        if not items:
            return self._revision()
        args: list[Any] = [_ms(ttl)]
        for key, value in items:
            args += (key, value)
        return int(self._changes(SET_MANY, [self._kp + k for k, _ in items], args))

    @_guarded
    def delete(self, key: str, *, if_revision: int | None = None) -> bool:
        expected = "" if if_revision is None else if_revision
        return bool(self._changes(DELETE, (self._kp + key,), (key, expected)))

    @_guarded
    def pop(self, key: str) -> bytes | None:
        return cast("bytes | None", self._changes(POP, (self._kp + key,), (key,)))

    @_guarded
    def incr(self, key: str, amount: int) -> int:
        if -(2**63) <= amount < 2**63:
            reply = self._changes(INCR, (self._kp + key,), (key, amount))[0]
            if reply == b"type":
                raise TypeError(f"the value at {key!r} is not an integer")
            if reply != b"range":
                return int(reply)
        return self._incr_big(key, amount)

    def _incr_big(self, key: str, amount: int) -> int:
        # Beyond 64 bits Redis cannot add: compare-and-set with Python's integers instead.
        while True:
            rec = self.get_record(key)
            old = 0 if rec is None else _decimal(rec.value, key)
            ttl = None
            if rec is not None and rec.expires_at is not None:
                ttl = rec.expires_at - time.time()
                if ttl <= 0:
                    continue
            revision = 0 if rec is None else rec.revision
            if self.set(key, str(old + amount).encode(), ttl=ttl, if_revision=revision):
                return old + amount

    @_guarded
    def expire(self, key: str, ttl: float | None) -> bool:
        args = (key, _ms(ttl), _ms(self._lease))
        return bool(self._changes(EXPIRE, (self._kp + key,), args))

    @_guarded
    def items(self, pattern: str | None = None) -> list[tuple[str, bytes]]:
        """Every live item matching ``pattern``, sorted.

        Redis cannot read many keys at one instant without blocking every other client, so this
        is SCAN-based: each SCAN step and the values of the keys it found are read by one script
        (one instant per batch of about 1000 keys). A key present and unchanged for the whole
        call is returned with its value; a key written, created or deleted during the call may
        or may not appear, and each value returned is one the key really had during the call.
        Batches are not a snapshot of one instant taken together.
        """
        match = self._key_match(pattern)
        found: dict[str, bytes] = {}
        cursor: Any = 0
        while True:
            cursor, keys, values = SCAN_ITEMS(self._cmd, (), (cursor, match, _SCAN_COUNT))
            for raw, value in zip(keys, values, strict=True):
                key = raw[len(self._kp_bytes) :].decode()
                if pattern is None or fnmatchcase(key, pattern):
                    found[key] = value
            if int(cursor) == 0:
                return sorted(found.items())

    @_guarded
    def keys(self, pattern: str | None = None) -> list[str]:
        return sorted(self._scan_keys(pattern))

    def _scan_keys(self, pattern: str | None) -> dict[str, None]:
        match = self._key_match(pattern)
        found: dict[str, None] = {}
        cursor = 0
        while True:
            cursor, raws = self._cmd("SCAN", cursor, "MATCH", match, "COUNT", _SCAN_COUNT)
            for raw in raws:
                key = raw[len(self._kp_bytes) :].decode()
                if pattern is None or fnmatchcase(key, pattern):
                    found[key] = None
            if int(cursor) == 0:
                return found

    def _key_match(self, pattern: str | None) -> bytes:
        return _escape_glob(self._kp) + _redis_glob(pattern or "*", fold=False)

    @_guarded
    def count(self) -> int:
        return len(self._scan_keys(None))

    @_guarded
    def clear(self) -> None:
        """Delete every key, in SCAN batches: keys written while clear() runs may survive."""
        match = self._key_match(None)
        cursor = 0
        while True:
            cursor, raws = self._cmd("SCAN", cursor, "MATCH", match, "COUNT", _SCAN_COUNT)
            names = sorted(raw[len(self._kp_bytes) :].decode() for raw in raws)
            if names:
                self._changes(CLEAR, [self._kp + k for k in names], names)
            if int(cursor) == 0:
                return

    @_guarded
    def revision(self) -> int:
        return self._revision()

    def _revision(self) -> int:
        return int(REVISION(self._cmd, (self._hist,), ()))

    # -- messaging -------------------------------------------------------------------------
    @_guarded
    def publish(self, channel: str, payload: bytes) -> int:
        hint = self._ns.encode() + b"h:m:" + _fold(channel)
        keys = (self._meta, self._ns + "c:" + channel, self._ns + "cm:" + channel)
        args = (hint, channel, payload, self._buffer, self._buffer_bytes, CHANNEL_LIFETIME_MS)
        return int(PUBLISH(self._cmd, keys, args))

    @_guarded
    def subscribe(self, patterns: Iterable[str], *, callbacks: bool = False) -> Feed:
        feed = _MessageFeed(self, tuple(patterns))
        exact = [p for p in feed.patterns if not _has_glob(p)]
        marks = CHANNEL_MARKS(self._cmd, (self._meta, *(self._ns + "cm:" + p for p in exact)), ())
        seqs = {p: int(m.split()[0]) if m else 0 for p, m in zip(exact, marks[1:], strict=True)}
        feed.start(int(marks[0]), seqs)
        self._listen(feed, self._message_routes(feed.patterns))
        return feed

    def _message_routes(self, patterns: tuple[str, ...]) -> list[_RouteSpec]:
        head = _escape_glob(self._ns) + b"h:m"
        specs = []
        for pattern in patterns:
            if _has_glob(pattern):
                tail, exact = _redis_glob(pattern, fold=True), None
            else:
                tail, exact = _escape_glob(pattern, fold=True), self._ns.encode() + b"h:m:"
                exact += _fold(pattern)
            specs.append(_RouteSpec(head, tail, exact))
        return specs

    @_guarded
    def watch(self, pattern: str, since: int | None) -> Feed:
        feed = _WatchFeed(self, pattern)
        if _has_glob(pattern):
            name = _escape_glob(self._ns) + b"h:k:" + _redis_glob(pattern, fold=True)
            spec = _RouteSpec(name, b"", None, shared=True)
        else:
            spec = _RouteSpec(b"", b"", self._ns.encode() + b"h:k:" + _fold(pattern), shared=True)
        self._listen(feed, [spec])
        try:
            self._listener.plan_sweep(self._sweep())
            current, oldest = self._history_bounds()
            if since is not None and since < current and since + 1 < oldest:
                raise RevisionTooOldError(
                    f"changes after revision {since} are no longer retained "
                    f"(the oldest retained is {oldest})",
                    oldest,
                )
        except BaseException:
            feed.close()
            raise
        feed.cursor = current if since is None else min(since, current)
        if since is not None and feed.cursor < current:
            feed.hint(None)
        return feed

    def _history_bounds(self) -> tuple[int, int]:
        """The current revision and the oldest retained in the history, read at one instant."""
        current, oldest = HISTORY_BOUNDS(self._cmd, (self._hist,), ())
        return int(current), current + 1 if oldest is None else int(oldest)

    def _sweep(self) -> int:
        """Record "expire" for keys whose time came; ms until the next deadline (-1: none)."""
        return int(self._changes(SWEEP, (), (_SWEEP_BATCH,)))

    def _listen(self, feed: _RedisFeed, specs: list[_RouteSpec]) -> None:
        with self._lock:
            self._feeds.append(feed)
        try:
            self._listener.add(feed, specs, self._timeout)
        except BaseException:
            self._forget_feed(feed)
            raise

    def _forget_feed(self, feed: _RedisFeed) -> None:
        with self._lock:
            if feed in self._feeds:
                self._feeds.remove(feed)

    @_guarded
    def read_history(self, after: int) -> list[tuple[int, str, str, bytes | None]]:
        """Every retained change after revision ``after``, oldest first."""
        out: list[tuple[int, str, str, bytes | None]] = []
        while True:
            page = self._cmd("XRANGE", self._hist, f"(0-{after}", "+", "COUNT", _HISTORY_PAGE)
            for entry_id, fields in page:  # id "0-<revision>"; fields: o, op, k, key[, v, value]
                after = int(entry_id[2:])
                value = fields[5] if len(fields) > 5 else None
                out.append((after, _OPS[fields[1]], fields[3].decode(), value))
            if len(page) < _HISTORY_PAGE:
                return out

    @_guarded
    def message_count(self) -> int:
        return int(self._cmd("HGET", self._meta, "msgs") or 0)

    @_guarded
    def read_channels(
        self, cursors: Sequence[tuple[str, int]]
    ) -> list[list[tuple[int, int, int, bytes]]]:
        """For each (channel, message id), the retained messages after that id:
        (message id, seq, previous message id, payload), oldest first."""
        pages = self._cmd.many(
            [("XRANGE", self._ns + "c:" + channel, after + 1, "+") for channel, after in cursors]
        )
        out = []
        for page in pages:
            entries = []
            for entry_id, fields in page:  # fields: p, payload, q, previous msg id
                msgid, seq = entry_id.split(b"-")
                entries.append((int(msgid), int(seq), int(fields[3]), fields[1]))
            out.append(entries)
        return out

    # -- queues ----------------------------------------------------------------------------
    @_guarded
    def queue_put(self, name: str, item: bytes, maxsize: int) -> bool:
        hint = self._ns + "h:q:" + name
        return bool(QUEUE_PUT(self._cmd, (self._ns + "q:" + name,), (item, maxsize, hint)))

    @_guarded
    def queue_get(self, name: str) -> bytes | None:
        hint = self._ns + "h:q:" + name
        return cast("bytes | None", QUEUE_GET(self._cmd, (self._ns + "q:" + name,), (hint,)))

    @_guarded
    def queue_put_many(self, name: str, items: Sequence[bytes], maxsize: int) -> bool:
        hint = self._ns + "h:q:" + name
        keys = (self._ns + "q:" + name,)
        return bool(QUEUE_PUT_MANY(self._cmd, keys, (maxsize, hint, *items)))

    @_guarded
    def queue_get_many(self, name: str, max_items: int) -> list[bytes]:
        hint = self._ns + "h:q:" + name
        taken = QUEUE_GET_MANY(self._cmd, (self._ns + "q:" + name,), (max_items, hint))
        return cast("list[bytes]", taken or [])

    @_guarded
    def queue_size(self, name: str) -> int:
        return int(self._cmd("LLEN", self._ns + "q:" + name))

    @_guarded
    def queue_feed(self, name: str) -> Feed:
        return self._wake_feed("q", name)

    def _wake_feed(self, kind: str, name: str) -> Feed:
        feed = _WakeFeed(self, kind, name)
        exact = (self._ns + "h:" + kind + ":" + name).encode()
        self._listen(feed, [_RouteSpec(b"", b"", exact, shared=True)])
        return feed

    # -- locks -----------------------------------------------------------------------------
    def _lock_keys(self, name: str) -> tuple[str, str]:
        return self._ns + "l:" + name, self._ns + "lo:" + name

    @_guarded
    def lock_acquire(self, name: str, limit: int, owner: LockInfo) -> bool:
        info = f"{owner.pid}|{owner.thread_id}|{owner.since!r}|{owner.thread_name}"
        args = (owner.ident, limit, _ms(self._lease), info)
        if not LOCK_ACQUIRE(self._cmd, self._lock_keys(name), args):
            return False
        with self._lock:
            self._held[(name, str(owner.ident))] = None
        self._listener.need_renewals()
        return True

    @_guarded
    def lock_release(self, name: str, owner: LockInfo) -> bool:
        with self._lock:
            self._held.pop((name, str(owner.ident)), None)
        args = (owner.ident, self._ns + "h:l:" + name)
        return bool(LOCK_RELEASE(self._cmd, self._lock_keys(name), args))

    @_guarded
    def lock_owners(self, name: str) -> list[LockInfo]:
        reply = LOCK_OWNERS(self._cmd, self._lock_keys(name), ())
        owners = []
        for ident, info in zip(reply[::2], reply[1::2], strict=True):
            pid, thread_id, since, thread_name = info.decode(errors="replace").split("|", 3)
            owners.append(LockInfo(int(pid), int(thread_id), thread_name, float(since), int(ident)))
        return sorted(owners, key=lambda o: o.since)

    @_guarded
    def lock_feed(self, name: str) -> Feed:
        return self._wake_feed("l", name)

    # -- leases (run by the background thread) ----------------------------------------------
    def _hold_ephemeral(self, key: str) -> None:
        with self._lock:
            self._generation += 1
            self._ephemeral[key] = self._generation
        self._listener.need_renewals()

    def renew_leases(self) -> bool:
        """Extend the leases of this process's locks and ephemeral keys; False when none."""
        with self._lock:
            held = list(self._held)
            ephemeral = dict(self._ephemeral)
        if held:
            keys: list[str] = []
            for name, _ in held:
                keys += self._lock_keys(name)
            lost = RENEW_LOCKS(self._cmd, keys, (_ms(self._lease), *(i for _, i in held)))
            self._forget_held([int(x) for x in lost], held)
        if ephemeral:
            args = (self._kp, self._token, _ms(self._lease), *ephemeral)
            lost = RENEW_EPHEMERAL(self._cmd, (self._exp,), args)
            with self._lock:
                for raw in lost:
                    key = raw.decode()
                    if self._ephemeral.get(key) == ephemeral[key]:  # not set again meanwhile
                        del self._ephemeral[key]
        with self._lock:
            return bool(self._held or self._ephemeral)

    def _forget_held(self, lost: list[int], held: list[tuple[str, str]]) -> None:
        if not lost:
            return
        with self._lock:
            for name, ident in held:
                if int(ident) in lost:
                    self._held.pop((name, ident), None)
                    log.warning("sharedkv: lost lock %r (its lease ran out)", name)

    def sweep_for_watchers(self) -> int | None:
        """Run by the background thread while this process watches keys."""
        with self._lock:
            watching = any(isinstance(f, _WatchFeed) and not f.closed for f in self._feeds)
        return self._sweep() if watching else None

    def live_feeds(self) -> list[_RedisFeed]:
        with self._lock:
            return [f for f in self._feeds if not f.closed]

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        """Release this process's locks and ephemeral keys, stop the thread, close the pool."""
        if self._closed:
            return
        self._closed = True  # (no lock: in a forked child it may be held by a lost thread)
        if self._pid != os.getpid():
            self._listener.abandon()
            return
        self._release_leases()
        self._listener.stop()
        for feed in self.live_feeds():
            feed.close()
        self._pool.disconnect()

    def _release_leases(self) -> None:
        with self._lock:
            held, self._held = list(self._held), {}
            ephemeral, self._ephemeral = list(self._ephemeral), {}
        try:
            for name, ident in held:
                LOCK_RELEASE(self._cmd, self._lock_keys(name), (ident, self._ns + "h:l:" + name))
            if ephemeral:
                keys = [self._kp + k for k in ephemeral]
                self._changes(DROP_EPHEMERAL, keys, (self._token, *ephemeral))
        except redis.RedisError as exc:
            log.warning("sharedkv: could not release leases on close (they expire): %s", exc)

    @_guarded
    def stats(self) -> dict[str, Any]:
        msgs, dropped = self._cmd("HMGET", self._meta, "msgs", "dropped")
        with self._lock:
            locks_held = len(self._held)
        return {
            "url": self.url,
            "server": f"redis {self.server_version} at {self._address.where}",
            "namespace": self.namespace,
            "keys": self.count(),
            "revision": self._revision(),
            "messages_published": int(msgs or 0),
            "messages_dropped": int(dropped or 0),
            "locks_held": locks_held,
        }

    @_guarded
    def add_dropped(self, count: int) -> None:
        self._cmd("HINCRBY", self._meta, "dropped", count)


def _ms(seconds: float | None) -> str:
    """Seconds as whole milliseconds for a script ('' for None), never 0 for a positive time."""
    if seconds is None:
        return ""
    return str(max(1, round(seconds * 1000)))


def _decimal(value: bytes, key: str) -> int:
    if value[:1] and value[:1] in b"-0123456789":
        return int(value)
    raise TypeError(f"the value at {key!r} is not an integer")


# =============================================================================================
# The background thread: subscribed connection, hint routing, lease renewal, expiry sweeps
# =============================================================================================


@dataclass
class _RouteSpec:
    """How a feed wants to be woken: a channel (``exact``) or a pattern (``head`` + ``tail``).

    Message subscriptions are not ``shared``: each gets its own Redis subscription, so that
    PUBLISH counts subscriptions as the other backends do. A second subscription to the same
    name is spelled differently but equivalently: ``head[:]tail``, ``head[::]tail``, ...
    """

    head: bytes
    tail: bytes
    exact: bytes | None
    shared: bool = False

    def spelling(self, k: int) -> tuple[bytes, bool]:
        """The k-th equivalent Redis name and whether it is a pattern."""
        if self.shared:
            return (self.exact, False) if self.exact is not None else (self.head, True)
        if k == 0:
            return (
                (self.exact, False)
                if self.exact is not None
                else (self.head + b":" + self.tail, True)
            )
        return self.head + b"[" + b":" * k + b"]" + self.tail, True


@dataclass
class _Route:
    pattern: bool
    feeds: list[_RedisFeed] = field(default_factory=list)
    confirmed: threading.Event = field(default_factory=threading.Event)


class _Listener:
    """One thread per backend: it owns a subscribed connection and never shares it.

    Callers ask for (un)subscriptions through :meth:`add` and :meth:`remove`, which queue the
    command and wake the thread by publishing to this process's control channel; the thread
    sends it and reports the server's confirmation. Idle, the thread sleeps in a socket read
    (or until the next lease renewal or key deadline). After a reconnect it subscribes again
    and wakes every feed to re-read, since hints may have been lost meanwhile.
    """

    def __init__(self, backend: RedisBackend) -> None:
        self._backend = backend
        self._ctl = (backend._ns + "h:x:" + backend._token).encode()
        self._lock = threading.Lock()
        self._routes: dict[bytes, _Route] = {}
        self._ops: list[tuple[str, bytes]] = []  # (command, name) waiting to be sent
        self._outstanding: dict[bytes, int] = {}  # name -> commands sent but not confirmed
        self._settled: dict[bytes, threading.Event] = {}  # unsubscribes a caller waits for
        self._conn: Any = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._sleep = threading.Event()
        self._resync = False
        self._ever_connected = False
        self._renew_at: float | None = None
        self._sweep_at: float | None = None

    # -- called by other threads -----------------------------------------------------------
    def add(self, feed: _RedisFeed, specs: list[_RouteSpec], timeout: float) -> None:
        """Route hints for ``specs`` to ``feed``; returns once the server confirmed them."""
        waits = []
        with self._lock:
            for spec in specs:
                name, is_pattern = self._free_spelling(spec)
                route = self._routes.get(name)
                if route is None:
                    route = self._routes[name] = _Route(is_pattern)
                    self._ops.append(("PSUBSCRIBE" if is_pattern else "SUBSCRIBE", name))
                route.feeds.append(feed)
                feed.routes.append(name)
                waits.append(route.confirmed)
        deadline = time.monotonic() + timeout
        for event in waits:
            while not event.is_set():
                self._wake()  # again after a while: a wake-up sent while reconnecting is lost
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.remove(feed)
                    raise BackendUnavailableError(
                        f"Redis at {self._backend._address.where} did not confirm a "
                        f"subscription within {timeout:g} s"
                    )
                event.wait(min(remaining, 0.5))

    def _free_spelling(self, spec: _RouteSpec) -> tuple[bytes, bool]:
        k = 0
        while True:
            name, is_pattern = spec.spelling(k)
            if spec.shared or name not in self._routes:
                return name, is_pattern
            k += 1

    def remove(self, feed: _RedisFeed, timeout: float = 0.0) -> None:
        """Stop routing hints to ``feed``; wait up to ``timeout`` for the server to confirm
        (so that ``publish`` no longer counts it)."""
        waits = []
        with self._lock:
            for name in feed.routes:
                route = self._routes.get(name)
                if route is None or feed not in route.feeds:
                    continue
                route.feeds.remove(feed)
                if not route.feeds:
                    del self._routes[name]
                    self._ops.append(("PUNSUBSCRIBE" if route.pattern else "UNSUBSCRIBE", name))
                    waits.append(self._settled.setdefault(name, threading.Event()))
            feed.routes.clear()
            running = self._thread is not None and not self._stopping
            connected = self._conn is not None
        if not running or not waits:
            return
        self._wake()
        deadline = time.monotonic() + timeout
        for event in waits if connected else ():
            event.wait(max(0.0, deadline - time.monotonic()))

    def need_renewals(self) -> None:
        """A lease is now held: make sure the thread renews it in time."""
        with self._lock:
            if self._renew_at is not None:
                return
            self._renew_at = time.monotonic() + self._backend._lease / 3
        self._wake()

    def plan_sweep(self, ms: int) -> None:
        """The next key deadline is ``ms`` away (-1: none)."""
        if ms < 0:
            return
        at = time.monotonic() + ms / 1000
        with self._lock:
            if self._sweep_at is not None and self._sweep_at <= at:
                return
            self._sweep_at = at
        self._wake()

    def _wake(self) -> None:
        """Start the thread, or make it look at its queue and timers again."""
        with self._lock:
            if self._stopping:
                return
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"sharedkv-redis-{self._backend.namespace}", daemon=True
                )
                self._thread.start()
                return
            connected = self._conn is not None
        self._sleep.set()
        if connected:
            with contextlib.suppress(redis.RedisError):
                self._backend._cmd("PUBLISH", self._ctl, b"")

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            thread, conn = self._thread, self._conn
        self._sleep.set()
        sock = getattr(conn, "_sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                # The plain socket's shutdown (not TLS's): it ends the thread's blocked read.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        self._disconnect()

    def abandon(self) -> None:
        """In a forked child: the thread does not exist here; drop the parent's socket."""
        self._stopping = True
        self._conn = None  # redis-py closes our copy of the socket without shutting it down

    # -- the thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        delay = _RETRY_MIN
        while not self._stopping:
            self._run_timers()
            try:
                if self._conn is None:
                    self._connect()
                self._send_ops()
                if self._conn.can_read(timeout=self._idle_timeout()):
                    self._drain()
                delay = _RETRY_MIN
            except Exception as exc:  # the thread must outlive anything: it retries
                self._disconnect()
                if self._stopping:
                    break
                if isinstance(exc, (redis.RedisError, OSError)):
                    log.debug("sharedkv: Redis subscription connection lost: %s", exc)
                else:
                    log.exception("sharedkv: the Redis background thread failed; retrying")
                timeout = self._idle_timeout()
                self._sleep.wait(delay if timeout is None else min(delay, timeout))
                self._sleep.clear()
                delay = min(delay * 2, _RETRY_MAX)

    def _connect(self) -> None:
        conn: Any = self._backend._pool.make_connection()
        conn.connect()
        with self._lock:
            names = [(name, route.pattern) for name, route in self._routes.items()]
            self._ops.clear()
            self._outstanding = {}
            self._conn = conn
        channels = [n for n, is_pattern in names if not is_pattern]
        patterns = [n for n, is_pattern in names if is_pattern]
        if channels:
            self._send("SUBSCRIBE", channels)
        if patterns:
            self._send("PSUBSCRIBE", patterns)
        self._send("SUBSCRIBE", [self._ctl])
        self._resync = self._ever_connected
        self._ever_connected = True

    def _send(self, command: str, names: list[bytes]) -> None:
        for name in names:
            self._outstanding[name] = self._outstanding.get(name, 0) + 1
        self._conn.send_command(command, *names, check_health=False)

    def _send_ops(self) -> None:
        with self._lock:
            ops, self._ops = self._ops, []
        for command, name in ops:
            self._send(command, [name])

    def _disconnect(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            for route in self._routes.values():
                route.confirmed.clear()
            settled, self._settled = list(self._settled.values()), {}
        for event in settled:
            event.set()  # no connection, no subscription left to wait for
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.disconnect()

    def _idle_timeout(self) -> float | None:
        with self._lock:
            timers = [t for t in (self._renew_at, self._sweep_at) if t is not None]
        if not timers:
            return None
        return max(0.0, min(timers) - time.monotonic())

    def _drain(self) -> None:
        for _ in range(10_000):  # then look at timers and queued commands again
            # push_request: with RESP3 (redis-py's default) messages are push replies.
            self._dispatch(self._conn.read_response(push_request=True))
            if not self._conn.can_read(timeout=0):
                return

    def _dispatch(self, message: Any) -> None:
        kind = message[0]
        if kind == b"message":
            self._deliver(message[1], message[2])
        elif kind == b"pmessage":
            self._deliver(message[1], message[3])
        elif kind in (b"subscribe", b"psubscribe", b"unsubscribe", b"punsubscribe"):
            self._confirmed(message[1])

    def _confirmed(self, name: bytes) -> None:
        with self._lock:
            left = self._outstanding.get(name, 1) - 1
            if left > 0:
                self._outstanding[name] = left
                return
            self._outstanding.pop(name, None)
            route = self._routes.get(name)
            settled = self._settled.pop(name, None)
        if settled is not None:
            settled.set()
        if route is not None:
            route.confirmed.set()
        if name == self._ctl and self._resync:
            # Every subscription sent before the control channel is confirmed: now re-read.
            self._resync = False
            for feed in self._backend.live_feeds():
                feed.hint(None)

    def _deliver(self, name: bytes, data: bytes) -> None:
        with self._lock:
            route = self._routes.get(name)
            feeds = list(route.feeds) if route is not None else []
        for feed in feeds:
            try:
                if feed.deliver(data):
                    with self._lock:
                        self._sweep_at = time.monotonic()
            except Exception:  # one broken feed must not stop the others
                log.exception("sharedkv: a feed failed to take a wake-up")

    def _run_timers(self) -> None:
        now = time.monotonic()
        with self._lock:
            renew = self._renew_at is not None and self._renew_at <= now
            sweep = self._sweep_at is not None and self._sweep_at <= now
        if renew:
            self._timer(self._renew)
        if sweep:
            self._timer(self._sweep)

    def _timer(self, work: Callable[[], None]) -> None:
        try:
            work()
        except Exception as exc:  # retried soon; never the end of the thread
            if isinstance(exc, (redis.RedisError, OSError)):
                log.debug("sharedkv: background Redis work failed, will retry: %s", exc)
            else:
                log.exception("sharedkv: background Redis work failed, will retry")
            with self._lock:  # try again soon, but do not spin while the server is away
                soon = time.monotonic() + min(1.0, self._backend._lease / 3)
                if work == self._renew:
                    self._renew_at = soon
                else:
                    self._sweep_at = soon

    def _renew(self) -> None:
        more = self._backend.renew_leases()
        with self._lock:
            self._renew_at = time.monotonic() + self._backend._lease / 3 if more else None

    def _sweep(self) -> None:
        ms = self._backend.sweep_for_watchers()
        with self._lock:
            if ms is None or ms < 0:
                self._sweep_at = None
            else:
                self._sweep_at = time.monotonic() + ms / 1000


# =============================================================================================
# Feeds
# =============================================================================================


class _RedisFeed(HintedFeed):
    """Hints from the background thread mark names dirty; ``fetch`` reads them from Redis."""

    def __init__(self, backend: RedisBackend, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.backend = backend
        self.patterns = patterns
        self.routes: list[bytes] = []  # Redis subscription names (kept by the listener)

    def deliver(self, data: bytes) -> bool:
        """A hint arrived (called by the background thread). True: a deadline was set."""
        self.hint(None)
        return False

    def close(self) -> None:
        if self.closed:
            return
        backend = self.backend
        if not backend._closed and backend._pid == os.getpid():
            # Wait (briefly) for the unsubscribe, so that publish() stops counting this feed.
            backend._listener.remove(self, min(backend._timeout, 2.0))
        backend._forget_feed(self)
        super().close()


class _MessageFeed(_RedisFeed):
    """Messages of matching channels, read from each channel's capped stream.

    Each channel has a cursor: the id of the last message read (at first, the store's message
    count when the subscription started, so only later messages are delivered) and its seq,
    when known. The entry that follows a cursor names its predecessor (``q``); when that
    predecessor is newer than the cursor, it was trimmed unread, and a :class:`Gap` reports the
    lost seqs. For a channel first met through a glob pattern the seq at the start is unknown,
    so the gap's first seq is an upper bound on what was lost (exact unless other channels
    published in between).
    """

    def __init__(self, backend: RedisBackend, patterns: tuple[str, ...]) -> None:
        super().__init__(backend, patterns)
        self._start = 0
        self._cursors: dict[str, tuple[int, int | None]] = {}  # channel -> (msg id, seq)

    def start(self, msgid: int, seqs: dict[str, int]) -> None:
        self._start = msgid
        self._cursors = {channel: (msgid, seq) for channel, seq in seqs.items()}

    def deliver(self, data: bytes) -> bool:
        self.hint(data.decode("utf-8", "replace"))
        return False

    def fetch(self) -> list[Any]:
        dirty, everything = self.take_hints()
        if everything:
            dirty = list(dict.fromkeys([*dirty, *self._cursors]))
        wanted = [(c, p) for c in dirty if (p := glob_matches(self.patterns, c)) is not None]
        if not wanted:
            return []
        try:
            if everything:
                self._check_restart()
            pages = self.backend.read_channels([(c, self._after(c)) for c, _ in wanted])
        except BaseException:
            self.restore_hints(dirty, everything)
            raise
        events: list[tuple[float, Any]] = []
        for (channel, pattern), entries in zip(wanted, pages, strict=True):
            if entries:
                self._take(channel, None if pattern == channel else pattern, entries, events)
        events.sort(key=lambda e: e[0])  # publish order across channels
        return [event for _, event in events]

    def _check_restart(self) -> None:
        # After a reconnect: a server restarted without its data counts messages from 0 again.
        newest = max([self._start, *(msgid for msgid, _ in self._cursors.values())])
        if self.backend.message_count() < newest:
            self._start = 0
            self._cursors = dict.fromkeys(self._cursors, (0, 0))

    def _after(self, channel: str) -> int:
        cursor = self._cursors.get(channel)
        return self._start if cursor is None else cursor[0]

    def _take(
        self,
        channel: str,
        shown: str | None,
        entries: list[tuple[int, int, int, bytes]],
        events: list[tuple[float, Any]],
    ) -> None:
        last_id, last_seq = self._cursors.get(channel, (self._start, None))
        first_id, first_seq, previous, _ = entries[0]
        if previous > last_id:  # the message before the first we read was trimmed unread
            if last_seq is None:
                lowest = max(1, first_seq - (first_id - last_id - 1))
            else:
                lowest = last_seq + 1 if first_seq > last_seq else 1  # 1: the channel restarted
            if lowest < first_seq:
                events.append((first_id - 0.5, Gap(channel, lowest, first_seq - 1)))
        for msgid, seq, _, payload in entries:
            events.append((msgid, (channel, payload, seq, shown)))
        self._cursors[channel] = (entries[-1][0], entries[-1][1])


class _WatchFeed(_RedisFeed):
    """Changes to matching keys, read from the history stream after a revision cursor."""

    def __init__(self, backend: RedisBackend, pattern: str) -> None:
        super().__init__(backend, (pattern,))
        self.cursor = 0

    def deliver(self, data: bytes) -> bool:
        self.hint(data[1:].decode("utf-8", "replace"))
        return data[:1] == b"x"

    def fetch(self) -> list[Any]:
        dirty, everything = self.take_hints()
        if not dirty and not everything:
            return []
        try:
            if everything and self.backend.revision() < self.cursor:
                self.cursor = 0  # the server restarted without its data: revisions start anew
            changes = self.backend.read_history(self.cursor)
        except BaseException:
            self.restore_hints(dirty, everything)
            raise
        pattern = self.patterns[0]
        out: list[Any] = []
        if changes and changes[0][0] > self.cursor + 1 and self.cursor > 0:
            out.append(Gap("", self.cursor + 1, changes[0][0] - 1))  # history trimmed unread
        for revision, kind, key, value in changes:
            self.cursor = revision
            if pattern == key or fnmatchcase(key, pattern):
                out.append((kind, key, revision, value))
        return out


class _WakeFeed(_RedisFeed):
    """Only wake-ups (blocking queue and lock waits); the waiter re-reads state itself."""

    def __init__(self, backend: RedisBackend, kind: str, name: str) -> None:
        super().__init__(backend, (name,))
        self.kind = kind

    def fetch(self) -> list[Any]:
        self.take_hints()
        return []
