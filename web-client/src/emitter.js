// Switchboard SDK: the event emitter of Room and Lobby.

/** Minimal event emitter; listeners that throw do not break the SDK. */
export class Emitter {
  /** @type {Map<string, Set<(arg: any) => void>>} */
  #listeners = new Map();

  /**
   * @param {string} type
   * @param {(arg: any) => void} fn
   * @returns {() => void} a function that removes the listener
   */
  on(type, fn) {
    let set = this.#listeners.get(type);
    if (!set) this.#listeners.set(type, (set = new Set()));
    set.add(fn);
    return () => this.off(type, fn);
  }

  /**
   * @param {string} type
   * @param {(arg: any) => void} fn
   */
  off(type, fn) {
    this.#listeners.get(type)?.delete(fn);
  }

  /**
   * @param {string} type
   * @param {any} [arg]
   */
  emit(type, arg) {
    for (const fn of [...(this.#listeners.get(type) ?? [])]) {
      try {
        fn(arg);
      } catch (err) {
        console.error(`switchboard: "${type}" listener threw`, err);
      }
    }
  }
}
