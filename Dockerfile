# syntax=docker/dockerfile:1
# exec-gateway container image.
#
#   docker build -t exec-gateway .
#   docker run -p 8080:8080 -p 8081:8081 -v exec-gateway-data:/data \
#     -e EXEC_GATEWAY_API_TOKEN=change-me exec-gateway
#
# The listeners bind 0.0.0.0 inside the container, which is not loopback: the gateway refuses to
# start without EXEC_GATEWAY_API_TOKEN (comma-separated bearer tokens) in that case.

ARG NODE_IMAGE=node:20-bookworm-slim

# ---- build: compile TypeScript and ssh2's optional native crypto binding ------------------------
FROM ${NODE_IMAGE} AS build
# python3/make/g++ let node-gyp build ssh2's binding and cpu-features; without them ssh2 silently
# falls back to slower pure-JS crypto.
RUN apt-get update \
  && apt-get install -y --no-install-recommends python3 make g++ \
  && rm -rf /var/lib/apt/lists/*
# The official image ships Node's headers under /usr/local/include/node: build against them rather
# than downloading a header tarball.
ENV npm_config_nodedir=/usr/local
WORKDIR /app
COPY package.json package-lock.json tsconfig.json tsconfig.sdk.json ./
# Sources come before `npm ci` because the package's `prepare` script runs the build during it.
COPY bin ./bin
COPY src ./src
COPY routes ./routes
COPY sdk ./sdk
COPY public ./public
COPY openapi ./openapi
RUN --mount=type=cache,target=/root/.npm npm ci
# Explicit, in case a future npm stops running `prepare` on ci; cheap when already built.
RUN npm run build
# Drop dev dependencies but keep the already-compiled native bindings (a fresh
# `npm ci --omit=dev --ignore-scripts` in the runtime stage would lose them, and running scripts
# there would need a compiler in the final image).
RUN npm prune --omit=dev

# ---- runtime --------------------------------------------------------------------------------------
FROM ${NODE_IMAGE} AS runtime
ENV NODE_ENV=production \
    EXEC_GATEWAY_LISTEN=0.0.0.0:8080 \
    EXEC_GATEWAY_SUPERVISOR_LISTEN=0.0.0.0:8081 \
    EXEC_GATEWAY_DATA_DIR=/data
WORKDIR /app
COPY --from=build --chown=root:root /app/package.json ./package.json
COPY --from=build --chown=root:root /app/node_modules ./node_modules
COPY --from=build --chown=root:root /app/bin ./bin
COPY --from=build --chown=root:root /app/dist ./dist
COPY --from=build --chown=root:root /app/openapi ./openapi
# The dashboard's page (xterm.js comes from node_modules).
COPY --from=build --chown=root:root /app/public ./public
# The data dir holds the gateway's SSH client key and token secret; it must be writable by `node`
# and survive container replacement.
RUN mkdir -p /data && chown node:node /data && chmod 0700 /data
VOLUME /data
USER node
EXPOSE 8080 8081
# /healthz needs no token, and a request to 127.0.0.1 passes the loopback Host check; with
# --tls-cert the check speaks HTTPS (liveness only: the certificate is not what it tests).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["node", "-e", "const tls=!!process.env.EXEC_GATEWAY_TLS_CERT;const port=(process.env.EXEC_GATEWAY_LISTEN||'').split(':').pop()||'8080';require(tls?'https':'http').get({host:'127.0.0.1',port,path:'/healthz',rejectUnauthorized:false},(r)=>process.exit(r.statusCode===200?0:1)).on('error',()=>process.exit(1))"]
# node directly (not npm or a shell) so SIGTERM reaches the gateway and its graceful shutdown runs.
CMD ["node", "bin/exec-gateway.js", "serve"]
