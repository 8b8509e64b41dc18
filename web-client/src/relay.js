// Switchboard SDK: channels to other participants through the server, for rooms on the SFU.
// One data channel on the publish connection (label `switchboard-relay`) carries envelopes the
// server routes by participant id (docs/protocol.md, *Relayed data*). Inside each payload this
// module multiplexes channels that behave as far as files.js needs like RTCDataChannels: open,
// text and binary messages in order, close, and a `bufferedAmount` that counts what that
// recipient has not acknowledged yet (and what waits to leave here), so a sender never holds
// more in the server than its budget allows, and a slow recipient slows only what goes to it.
//
// A payload: [1 byte: op, | 0x80 when the message's sender opened the channel]
//            [4 bytes: the channel's number, chosen by its opener, big-endian][data]
// ops: 0 open (data: the label, UTF-8), 1 text (UTF-8), 2 binary, 3 close,
//      4 ack (data: 4 bytes, every byte received on the channel so far, big-endian).

/** The label of the channel on the publish connection. */
export const RELAY_LABEL = 'switchboard-relay';
/** The recipient acknowledges every this many bytes received on a channel. */
const ACK_BYTES = 256 * 1024;
/** A channel whose recipient has acknowledged nothing for this long, with a window's worth
 * unacknowledged, has stalled: it is closed, and its transfer fails. */
const STALL_MS = 30_000;
/** Largest participant id an envelope carries. */
const MAX_ID_BYTES = 64;

const OP = { open: 0, text: 1, binary: 2, close: 3, ack: 4 };
const OPENED_BY_SENDER = 0x80;

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/**
 * One channel to one participant through the server: the part of RTCDataChannel files.js uses.
 */
export class RelayedChannel extends EventTarget {
  /** @type {'connecting' | 'open' | 'closing' | 'closed'} */ readyState = 'connecting';
  binaryType = 'arraybuffer';
  bufferedAmountLowThreshold = 0;
  /** @type {((ev: any) => void) | null} */ onopen = null;
  /** @type {((ev: {data: string | ArrayBuffer}) => void) | null} */ onmessage = null;
  /** @type {((ev: any) => void) | null} */ onclose = null;
  /** @type {((ev: any) => void) | null} */ onbufferedamountlow = null;
  /** Why the server ended it, when it did. @type {string | undefined} */ closeReason;
  /** Bytes sent on it, and the most the recipient has acknowledged. */
  sent = 0;
  acked = 0;
  /** When the recipient last acknowledged (or the channel opened). */
  lastAck = Date.now();
  /** Bytes received on it, and the most acknowledged. */
  received = 0;
  ackedReceived = 0;
  /** @type {RelayLink} */ #link;

  /**
   * @param {RelayLink} link
   * @param {string} peerId
   * @param {number} number
   * @param {boolean} mine  opened here
   * @param {string} label
   */
  constructor(link, peerId, number, mine, label) {
    super();
    this.#link = link;
    this.peerId = peerId;
    this.number = number;
    this.mine = mine;
    this.label = label;
  }

  /** What this side holds that the recipient has not acknowledged, over every channel to it. */
  get bufferedAmount() {
    return this.#link.unacknowledged(this.peerId);
  }

  /** @param {string | ArrayBuffer | ArrayBufferView} data */
  send(data) {
    if (this.readyState !== 'open') throw new DOMException('the channel is not open', 'InvalidStateError');
    const bytes = typeof data === 'string' ? encoder.encode(data) : new Uint8Array(ArrayBuffer.isView(data) ? data.buffer.slice(data.byteOffset, data.byteOffset + data.byteLength) : data);
    this.sent += bytes.byteLength;
    this.#link.write(this, typeof data === 'string' ? OP.text : OP.binary, bytes);
  }

  close() {
    if (this.readyState === 'closed' || this.readyState === 'closing') return;
    this.#link.write(this, OP.close, new Uint8Array(0));
    this.ended();
  }

  /** Closed, by either side or with the link. */
  ended() {
    if (this.readyState === 'closed') return;
    this.readyState = 'closed';
    this.#link.forget(this);
    setTimeout(() => this.#fire('close'));
  }

  opened() {
    this.readyState = 'open';
    setTimeout(() => this.#fire('open'));
  }

  /** @param {string | ArrayBuffer} data */
  deliver(data) {
    this.received += typeof data === 'string' ? encoder.encode(data).byteLength : data.byteLength;
    if (this.received - this.ackedReceived >= ACK_BYTES) {
      this.ackedReceived = this.received;
      const ack = new Uint8Array(4);
      new DataView(ack.buffer).setUint32(0, this.received);
      this.#link.write(this, OP.ack, ack);
    }
    this.#fire('message', { data });
  }

  /** The buffer may have drained below the threshold. */
  drained() {
    if (this.readyState === 'open' && this.bufferedAmount <= this.bufferedAmountLowThreshold) {
      this.#fire('bufferedamountlow');
    }
  }

  /**
   * @param {string} type
   * @param {object} [fields]
   */
  #fire(type, fields = {}) {
    const ev = Object.assign(new Event(type), fields);
    const handler = /** @type {any} */ (this)[`on${type}`];
    if (typeof handler === 'function') handler.call(this, ev);
    this.dispatchEvent(ev);
  }
}

/**
 * The relay channel of one publish connection, and the channels multiplexed on it.
 */
export class RelayLink {
  /** Channels by `${peerId} ${number} ${mine}`. @type {Map<string, RelayedChannel>} */
  #channels = new Map();
  #next = 0;
  /** @type {RTCDataChannel} */ #channel;
  /** Messages written before the relay channel opened. @type {Uint8Array<ArrayBuffer>[]} */
  #held = [];
  /** @type {(peerId: string, channel: RelayedChannel) => void} */ #incoming;
  /** @type {ReturnType<typeof setInterval> | undefined} */ #stallTimer;

  /**
   * @param {RTCPeerConnection} pc  the publish connection
   * @param {(peerId: string, channel: RelayedChannel) => void} incoming  a participant opened a channel
   */
  constructor(pc, incoming) {
    this.#incoming = incoming;
    this.#channel = pc.createDataChannel(RELAY_LABEL);
    this.#channel.binaryType = 'arraybuffer';
    // Low water at empty: any other threshold can be crossed while no channel is waiting, and
    // then nothing wakes the ones that wait later.
    this.#channel.bufferedAmountLowThreshold = 0;
    this.#channel.onopen = () => {
      for (const message of this.#held.splice(0)) this.#channel.send(message);
    };
    this.#channel.onmessage = (ev) => this.#read(ev.data);
    this.#channel.onbufferedamountlow = () => this.#drained();
    this.#channel.onclose = () => this.close();
  }

  /**
   * Opens a channel to `peerId`; it is open (its `open` event fires) at once, and what is sent
   * on it reaches the participant in order once the relay channel is up.
   * @param {string} peerId
   * @param {string} label
   */
  open(peerId, label) {
    const channel = new RelayedChannel(this, peerId, ++this.#next, true, label);
    this.#channels.set(key(peerId, channel.number, true), channel);
    this.#stallTimer ??= setInterval(() => this.#checkStalls(), STALL_MS / 6);
    this.write(channel, OP.open, encoder.encode(label));
    channel.opened();
    return channel;
  }

  /**
   * Bytes sent to `peerId` on every channel and not yet acknowledged, and those still queued
   * here for anyone.
   * @param {string} peerId
   */
  unacknowledged(peerId) {
    let total = this.#channel.bufferedAmount;
    for (const channel of this.#channels.values()) {
      if (channel.peerId === peerId) total += channel.sent - channel.acked;
    }
    return total;
  }

  /** Closes the channels whose recipients stopped acknowledging. */
  #checkStalls() {
    const now = Date.now();
    for (const channel of [...this.#channels.values()]) {
      if (channel.sent - channel.acked >= ACK_BYTES && now - channel.lastAck > STALL_MS) {
        channel.closeReason = 'the recipient stopped taking it';
        channel.close();
      }
    }
    if (this.#channels.size === 0) {
      clearInterval(this.#stallTimer);
      this.#stallTimer = undefined;
    }
  }

  /**
   * @param {RelayedChannel} channel
   * @param {number} op
   * @param {Uint8Array} data
   */
  write(channel, op, data) {
    const id = encoder.encode(channel.peerId);
    const message = new Uint8Array(1 + id.byteLength + 5 + data.byteLength);
    message[0] = id.byteLength;
    message.set(id, 1);
    const at = 1 + id.byteLength;
    message[at] = op | (channel.mine ? OPENED_BY_SENDER : 0);
    new DataView(message.buffer).setUint32(at + 1, channel.number);
    message.set(data, at + 5);
    if (this.#channel.readyState === 'open') this.#channel.send(message);
    else if (this.#channel.readyState === 'connecting') this.#held.push(message);
  }

  /** @param {RelayedChannel} channel */
  forget(channel) {
    this.#channels.delete(key(channel.peerId, channel.number, channel.mine));
    this.#drained();
  }

  /** The publish connection is gone: so is every channel on it. */
  close() {
    clearInterval(this.#stallTimer);
    this.#held.length = 0;
    for (const channel of [...this.#channels.values()]) channel.ended();
    if (this.#channel.readyState !== 'closed') this.#channel.close();
  }

  #drained() {
    for (const channel of this.#channels.values()) channel.drained();
  }

  /** @param {string | ArrayBuffer} data */
  #read(data) {
    if (typeof data === 'string') {
      this.#notice(data);
      return;
    }
    const bytes = new Uint8Array(data);
    const idLength = bytes[0];
    if (!idLength || idLength > MAX_ID_BYTES || bytes.byteLength < 1 + idLength + 5) return;
    const peerId = decoder.decode(bytes.subarray(1, 1 + idLength));
    const at = 1 + idLength;
    const op = bytes[at] & ~OPENED_BY_SENDER;
    // Opened by the sender: not by this side.
    const mine = (bytes[at] & OPENED_BY_SENDER) === 0;
    const number = new DataView(data).getUint32(at + 1);
    const body = bytes.subarray(at + 5);
    const found = this.#channels.get(key(peerId, number, mine));
    if (op === OP.open && !mine && !found) {
      const channel = new RelayedChannel(this, peerId, number, false, decoder.decode(body));
      this.#channels.set(key(peerId, number, false), channel);
      channel.readyState = 'open';
      this.#incoming(peerId, channel);
      return;
    }
    if (!found) return;
    if (op === OP.text) found.deliver(decoder.decode(body));
    else if (op === OP.binary) found.deliver(body.slice().buffer);
    else if (op === OP.close) found.ended();
    else if (op === OP.ack && body.byteLength >= 4) {
      found.acked = Math.max(found.acked, new DataView(body.buffer, body.byteOffset, 4).getUint32(0));
      found.lastAck = Date.now();
      this.#drained();
    }
  }

  /**
   * What the server said of messages it could not deliver: the channels they belonged to cannot
   * go on (their transfers fail, and say so).
   * @param {string} text
   */
  #notice(text) {
    /** @type {any} */
    let notice;
    try {
      notice = JSON.parse(text);
    } catch {
      return;
    }
    const peer = notice?.type === 'undeliverable' ? notice.to : notice?.type === 'dropped' ? notice.from : null;
    const reason =
      notice?.type === 'undeliverable'
        ? 'they cannot receive files through the server (they left, or their app cannot)'
        : 'the server dropped part of it (too much at once)';
    for (const channel of [...this.#channels.values()]) {
      if (notice?.type === 'over_budget' ? channel.mine : channel.peerId === peer) {
        channel.closeReason = reason;
        channel.close();
      }
    }
  }
}

/**
 * @param {string} peerId
 * @param {number} number
 * @param {boolean} mine
 */
function key(peerId, number, mine) {
  return `${peerId} ${number} ${mine}`;
}
