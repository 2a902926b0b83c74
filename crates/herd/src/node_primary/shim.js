// herd's `cluster` for the app's own primary (node.primary = "run").
//
// herd starts the app once more as its primary, with this file preloaded
// (NODE_OPTIONS=--require). The workers stay herd's: herd forks, restarts,
// reloads and deals connections. This module makes the primary branch see
// them through Node's `cluster` API: fork() hands out herd's slots in
// order, cluster.workers holds them, worker.send() (with a handle too) and
// cluster.on('message'|'fork'|'online'|'listening'|'disconnect'|'exit')
// work, all over the primary's own IPC channel to herd, one JSON object
// per line. README ("Node.js cluster apps") and docs/lifecycle.md say what
// maps onto what; crates/herd/src/node_primary/mod.rs is the other end.
'use strict';

const cluster = require('cluster');
const { EventEmitter } = require('events');

// Only in the process herd started as the app's primary: a child that
// inherited NODE_OPTIONS (a child_process.fork() of the app's) is not it.
const marker = process.env.HERD_NODE_PRIMARY;
if (marker !== undefined) {
  delete process.env.HERD_NODE_PRIMARY;
  // The app's own children do not load this file again.
  const options = process.env.NODE_OPTIONS || '';
  process.env.NODE_OPTIONS = options.split(marker).join('').trim();
  if (process.env.NODE_OPTIONS === '') delete process.env.NODE_OPTIONS;
  if (cluster.isPrimary && typeof process.send === 'function') install();
}

function install() {
  // Events of a slot the app has not fork()ed yet wait for it, at most this
  // many (then the oldest are dropped and herd logs it): a primary that
  // forks fewer workers than herd runs does not make this process grow.
  const MAX_HELD = 1000;
  const initialSlots = Number(process.env.HERD_WORKERS) || 0;
  const slots = [];
  const workers = {};

  function tell(message, handle, options, callback) {
    if (!process.connected) return false;
    return process.send(message, handle, options, callback);
  }

  function unsupported(what) {
    tell({ herd: 'unsupported', what });
  }

  class WorkerProcess extends EventEmitter {
    constructor(worker) {
      super();
      this.worker = worker;
      this.pid = undefined;
      this.connected = false;
      this.exitCode = null;
      this.signalCode = null;
    }
    kill(signal) {
      this.worker.kill(signal);
      return true;
    }
  }

  class Worker extends EventEmitter {
    constructor(id) {
      super();
      this.id = id;
      this.state = 'none';
      this.exitedAfterDisconnect = undefined;
      this.process = new WorkerProcess(this);
    }
    send(message, handle, options, callback) {
      if (typeof handle === 'function') {
        callback = handle;
        handle = undefined;
        options = undefined;
      } else if (typeof options === 'function') {
        callback = options;
        options = undefined;
      }
      if (!this.process.connected) {
        const error = new Error('Channel closed');
        error.code = 'ERR_IPC_CHANNEL_CLOSED';
        if (typeof callback === 'function') process.nextTick(callback, error);
        return false;
      }
      const envelope = { herd: 'send', id: this.id, pid: this.process.pid, msg: message };
      return tell(envelope, handle || undefined, options, callback);
    }
    kill(signal = 'SIGTERM') {
      if (this.process.pid !== undefined) tell({ herd: 'kill', id: this.id, pid: this.process.pid, signal });
    }
    destroy(signal) {
      this.kill(signal);
    }
    disconnect() {
      this.exitedAfterDisconnect = true;
      if (this.process.pid !== undefined) tell({ herd: 'disconnect', id: this.id, pid: this.process.pid });
      return this;
    }
    isConnected() {
      return this.process.connected;
    }
    isDead() {
      return this.process.exitCode != null || this.process.signalCode != null;
    }
  }

  // slots[i]: slot i (worker id i + 1). `current`: the Worker of its live
  // process; `waiting`: one fork() returned before herd started it;
  // `claimed`: fork() has handed it out, so its events are emitted.
  function slot(id) {
    while (slots.length < id) {
      const index = slots.length;
      // Slots herd adds later (herd scale) were never the app's to fork.
      slots.push({ claimed: index >= initialSlots, current: null, waiting: null, held: [] });
    }
    return slots[id - 1];
  }

  function deliver(s, event) {
    if (s.claimed) return event();
    if (s.held.length >= MAX_HELD) {
      s.held.shift();
      unsupported('events of a slot the primary never forked, dropped past ' + MAX_HELD);
    }
    s.held.push(event);
  }

  function claim(s, worker) {
    s.claimed = true;
    const held = s.held.splice(0);
    // After fork() returns, so that the app's handlers are attached.
    process.nextTick(() => held.forEach((event) => event()));
    return worker;
  }

  cluster.fork = function fork() {
    for (let i = 0; i < slots.length || i < initialSlots; i++) {
      const s = slot(i + 1);
      if (!s.claimed) return claim(s, s.current || (s.waiting = new Worker(i + 1)));
    }
    // A slot whose worker exited: this is the worker herd restarts there.
    for (let i = 0; i < slots.length; i++) {
      const s = slots[i];
      if (!s.current && !s.waiting) return (s.waiting = new Worker(i + 1));
    }
    // herd owns the count: this Worker never starts.
    unsupported('cluster.fork() beyond the ' + slots.length + ' slots herd runs');
    return new Worker(undefined);
  };

  cluster.workers = workers;
  const settings = (cluster.settings = cluster.settings || {});
  const setup = function setupPrimary(options) {
    Object.assign(settings, options);
    if (options && options.serialization === 'advanced') {
      unsupported('serialization "advanced" (herd relays JSON)');
    }
    cluster.emit('setup', settings);
  };
  cluster.setupPrimary = setup;
  cluster.setupMaster = setup;
  // herd owns the workers' lives: it stops them when herd stops.
  cluster.disconnect = function disconnect(callback) {
    if (typeof callback === 'function') process.nextTick(callback);
  };

  // Every worker process herd runs, by pid: during a reload a slot has
  // two (the new one started, the old one draining), sharing an id.
  const live = new Map();

  const on = {
    fork(m) {
      const s = slot(m.id);
      const worker = s.waiting || new Worker(m.id);
      s.waiting = null;
      s.current = worker;
      live.set(m.pid, worker);
      worker.process.pid = m.pid;
      worker.process.connected = true;
      deliver(s, () => {
        workers[m.id] = worker;
        cluster.emit('fork', worker);
      });
    },
    online(m, worker) {
      worker.state = 'online';
      deliver(slot(m.id), () => {
        worker.emit('online');
        cluster.emit('online', worker);
      });
    },
    listening(m, worker) {
      worker.state = 'listening';
      const address = m.address || {};
      deliver(slot(m.id), () => {
        worker.emit('listening', address);
        cluster.emit('listening', worker, address);
      });
    },
    message(m, worker, handle) {
      deliver(slot(m.id), () => {
        worker.emit('message', m.msg, handle);
        cluster.emit('message', worker, m.msg, handle);
      });
    },
    disconnect(m, worker) {
      if (!worker.process.connected) return;
      worker.process.connected = false;
      worker.state = 'disconnected';
      deliver(slot(m.id), () => {
        worker.emit('disconnect');
        cluster.emit('disconnect', worker);
      });
    },
    exit(m, worker) {
      on.disconnect(m, worker);
      live.delete(m.pid);
      const s = slot(m.id);
      if (s.current === worker) s.current = null;
      worker.state = 'dead';
      worker.exitedAfterDisconnect = !!worker.exitedAfterDisconnect;
      worker.process.exitCode = m.code;
      worker.process.signalCode = m.signal;
      deliver(s, () => {
        if (workers[m.id] === worker) delete workers[m.id];
        worker.process.emit('exit', m.code, m.signal);
        worker.emit('exit', m.code, m.signal);
        cluster.emit('exit', worker, m.code, m.signal);
      });
    },
  };

  process.on('message', (message, handle) => {
    if (message === null || typeof message !== 'object' || typeof message.herd !== 'string') return;
    const handler = Object.prototype.hasOwnProperty.call(on, message.herd) && on[message.herd];
    if (!handler || !Number.isInteger(message.id) || message.id < 1) return;
    if (message.herd === 'fork') return handler(message);
    // Events of a process the primary never heard start are herd's own
    // business (it was started before this primary, and told as forked).
    const worker = live.get(message.pid);
    if (worker) handler(message, worker, handle);
  });
}
