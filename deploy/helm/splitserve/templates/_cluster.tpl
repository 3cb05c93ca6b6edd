{{/*
The RayCluster spec: `spec` of the RayCluster, or `rayClusterConfig` of the RayService
(kind: RayService), which adds what its readiness gate needs (marked below). Indented from
column 0; callers nindent it.
*/}}
{{- define "splitserve.clusterSpec" -}}
{{- $pool := .Values.pool -}}
{{- $rayService := eq .Values.kind "RayService" -}}
rayVersion: {{ .Values.rayVersion | quote }}
enableInTreeAutoscaling: {{ .Values.autoscaler.enabled }}
{{- if .Values.autoscaler.enabled }}
autoscalerOptions:
  upscalingMode: Default
  idleTimeoutSeconds: {{ .Values.autoscaler.idleTimeoutSeconds }}
{{- end }}
headGroupSpec:
  serviceType: ClusterIP
  rayStartParams:
    dashboard-host: "0.0.0.0"
    num-cpus: "0"          # no worker actor on the head: its CPUs are the router's
    {{- if $rayService }}
    # RayService: only the head offers this, so the readiness gate runs beside the router.
    resources: '"{\"splitserve_router\": 1}"'
    {{- end }}
  template:
    metadata:
      labels:
        {{- include "splitserve.labels" . | nindent 8 }}
        app.kubernetes.io/component: router
      annotations:
        # A changed pool config changes the spec: a RayService rolls a new cluster out.
        splitserve.io/pool-config: {{ include "splitserve.pool" . | sha256sum | trunc 16 | quote }}
        {{- if .Values.metrics.scrapeAnnotations }}
        {{- include "splitserve.scrapeAnnotations" . | nindent 8 }}
        {{- end }}
    spec:
      terminationGracePeriodSeconds: {{ .Values.head.terminationGracePeriodSeconds }}
      {{- with .Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.head.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.head.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: ray-head
          image: {{ include "splitserve.image" . }}
          imagePullPolicy: {{ .Values.image.pullPolicy }}
          # Ray's head processes in the background (generated command minus --block), then
          # the router in the foreground; tini hands SIGTERM to the router only.
          command: ["/usr/bin/tini", "--", "/bin/bash", "-c", "--"]
          args:
            - |
              ulimit -n 65536
              eval "${KUBERAY_GEN_RAY_START_CMD/--block/}"
              exec splitserve serve --ray-address auto --config /etc/splitserve/pool.yaml
          {{- with .Values.env }}
          env:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          ports:
            - {name: gcs-server, containerPort: 6379}
            - {name: dashboard, containerPort: 8265}
            - {name: client, containerPort: 10001}
            - {name: metrics, containerPort: 8080}
            - {name: grpc, containerPort: {{ $pool.router.grpc_port }}}
            - {name: http, containerPort: {{ $pool.router.http_port }}}
            {{- if $rayService }}
            # Ray Serve's proxy (the gate's); KubeRay health-checks the port named `serve`.
            - {name: serve, containerPort: {{ .Values.rayService.servePort }}}
            {{- end }}
          resources:
            {{- toYaml .Values.head.resources | nindent 12 }}
          volumeMounts:
            - {name: pool-config, mountPath: /etc/splitserve, readOnly: true}
            - {name: models, mountPath: {{ .Values.models.mountPath }}, readOnly: true}
            - {name: dshm, mountPath: /dev/shm}
      volumes:
        - name: pool-config
          configMap:
            name: {{ include "splitserve.fullname" . }}-pool
        - name: models
          persistentVolumeClaim:
            claimName: {{ .Values.models.existingClaim }}
            readOnly: true
        - name: dshm
          emptyDir:
            medium: Memory
            sizeLimit: {{ .Values.head.shmSize }}
workerGroupSpecs:
  {{- if not $pool.colocated }}
  {{- include "splitserve.workerGroup" (dict "root" . "role" "prefill") | nindent 2 }}
  {{- end }}
  {{- include "splitserve.workerGroup" (dict "root" . "role" "decode") | nindent 2 }}
{{- end -}}
